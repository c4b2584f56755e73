-- Argo CD health check for switchyard.io/BankSwitch.
-- Written for Argo CD's Lua 5.1 (gopher-lua); also runs on Lua 5.4 for the chart tests.
local hs = {}

local function condition(obj, ctype)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

local function message(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return fallback
end

if obj.spec ~= nil and obj.spec.paused == true then
  hs.status = "Suspended"
  hs.message = "Paused: the operator makes no changes to this switch (spec.paused)"
  return hs
end

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile this BankSwitch"
  return hs
end

local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to act on generation " .. tostring(generation)
  return hs
end

local degraded = condition(obj, "Degraded")
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = message(degraded, "Degraded")
  return hs
end

local progressing = condition(obj, "Progressing")
if progressing ~= nil and progressing.status == "True" then
  hs.status = "Progressing"
  hs.message = message(progressing, "Rolling out")
  return hs
end

local ready = condition(obj, "Ready")
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = message(ready, "Ready")
  return hs
end

-- Not ready, yet neither degraded nor progressing: pods are still starting or a readiness
-- probe fails (e.g. migrations behind or the database unreachable). Argo CD retries.
hs.status = "Progressing"
hs.message = message(ready, "Waiting for the switch to become ready")
return hs
