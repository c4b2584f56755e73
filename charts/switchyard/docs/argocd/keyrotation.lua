-- Argo CD health check for switchyard.io/KeyRotation.
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

local phase = nil
if obj.status ~= nil then
  phase = obj.status.phase
end

if phase == nil or phase == "" then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to schedule this KeyRotation"
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = message(condition(obj, "Degraded"), "Key rotation failed")
elseif phase == "Rotating" then
  hs.status = "Progressing"
  local current = obj.status.currentRotation
  if current ~= nil and current.keyType ~= nil then
    hs.message = "Rotating " .. current.keyType .. " keys"
  else
    hs.message = "Rotating keys"
  end
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = "Suspended: no rotation starts (spec.suspend)"
elseif phase == "Idle" or phase == "Scheduled" or phase == "Succeeded" then
  hs.status = "Healthy"
  if obj.status.nextRotationAt ~= nil then
    hs.message = phase .. "; next rotation at " .. obj.status.nextRotationAt
  else
    hs.message = phase
  end
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. tostring(phase)
end
return hs
