//! An in-process fake Kubernetes API server for reconcile tests.
//!
//! It stores objects by path, answers GET/LIST/PATCH(apply)/DELETE/POST like the API server for
//! the shapes the operator uses, plays the Deployment and Job controllers just enough (ready
//! replicas, a Job outcome chosen by the test), and records every write so tests can assert
//! "no writes in a steady state".

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};

/// `bytes` as a Secret's `data` value: base64, encoded the way the API server's clients do
/// (k8s-openapi's `ByteString`).
#[allow(dead_code)] // reconcile.rs builds no Secret data
pub fn secret_value(bytes: &[u8]) -> Value {
    serde_json::to_value(k8s_openapi::ByteString(bytes.to_vec())).expect("bytes serialize")
}

/// How the fake Job controller finishes migration Jobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobOutcome {
    /// Jobs complete at once.
    Complete,
    /// Jobs fail at once.
    Failed,
    /// Jobs stay running.
    Running,
}

/// One recorded write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    /// HTTP method.
    pub method: String,
    /// Path without query.
    pub path: String,
}

#[derive(Debug)]
pub struct State {
    pub objects: BTreeMap<String, Value>,
    pub writes: Vec<Write>,
    pub job_outcome: JobOutcome,
    pub monitoring_api: bool,
    /// Whether `cert-manager.io/v1` is served (discovery answers 404 otherwise).
    pub cert_manager_api: bool,
    /// Paths of objects whose full body (not the metadata-only form) was served: tests assert
    /// that an unlabelled Secret's data is never read.
    pub full_reads: Vec<String>,
    /// Writes to paths containing this answer 500 (an API server having a bad day).
    pub fail_writes_to: Option<String>,
    next_uid: u64,
}

/// Shared handle to the fake.
#[derive(Clone, Debug)]
pub struct FakeApi(pub Arc<Mutex<State>>);

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn label_selector(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter_map(|kv| kv.strip_prefix("labelSelector="))
        .flat_map(|sel| {
            percent_decode(sel)
                .split(',')
                .filter_map(|pair| {
                    pair.split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

impl FakeApi {
    pub fn new(job_outcome: JobOutcome, monitoring_api: bool) -> Self {
        Self(Arc::new(Mutex::new(State {
            objects: BTreeMap::new(),
            writes: Vec::new(),
            job_outcome,
            monitoring_api,
            cert_manager_api: false,
            full_reads: Vec::new(),
            fail_writes_to: None,
            next_uid: 1,
        })))
    }

    /// A kube client talking to this fake.
    pub fn client(&self) -> kube::Client {
        let fake = self.clone();
        let service = tower::service_fn(move |req: Request<Body>| {
            let fake = fake.clone();
            async move { Ok::<_, Infallible>(fake.handle(req).await) }
        });
        kube::Client::new(service, "default")
    }

    pub fn writes(&self) -> Vec<Write> {
        self.0.lock().expect("lock").writes.clone()
    }

    pub fn clear_writes(&self) {
        self.0.lock().expect("lock").writes.clear();
    }

    pub fn set_cert_manager_api(&self, served: bool) {
        self.0.lock().expect("lock").cert_manager_api = served;
    }

    /// Paths whose full object was read with a GET (metadata-only reads are not listed).
    pub fn full_reads(&self) -> Vec<String> {
        self.0.lock().expect("lock").full_reads.clone()
    }

    pub fn fail_writes_to(&self, fragment: Option<&str>) {
        self.0.lock().expect("lock").fail_writes_to = fragment.map(str::to_owned);
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.0.lock().expect("lock").objects.get(path).cloned()
    }

    pub fn insert(&self, path: &str, obj: Value) {
        self.0
            .lock()
            .expect("lock")
            .objects
            .insert(path.to_owned(), obj);
    }

    pub fn remove(&self, path: &str) -> Option<Value> {
        self.0.lock().expect("lock").objects.remove(path)
    }

    /// The stored object's status condition of `type_` (`Null` when absent).
    pub fn condition(&self, path: &str, type_: &str) -> Value {
        let obj = self.get(path).expect("stored");
        obj["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == type_).cloned())
            .unwrap_or(Value::Null)
    }

    /// Every Event stored in `namespace`.
    pub fn events(&self, namespace: &str) -> Vec<Value> {
        let prefix = format!("/apis/events.k8s.io/v1/namespaces/{namespace}/events/");
        self.names_under(&prefix)
            .iter()
            .filter_map(|n| self.get(&format!("{prefix}{n}")))
            .collect()
    }

    /// The `reason` of every Event stored in `namespace`.
    pub fn event_reasons(&self, namespace: &str) -> Vec<String> {
        self.events(namespace)
            .iter()
            .filter_map(|e| e["reason"].as_str().map(str::to_owned))
            .collect()
    }

    /// Paths of stored objects under a collection prefix, e.g. `/apis/apps/v1/namespaces/ns/deployments/`.
    pub fn names_under(&self, prefix: &str) -> Vec<String> {
        self.0
            .lock()
            .expect("lock")
            .objects
            .keys()
            .filter_map(|k| k.strip_prefix(prefix).map(str::to_owned))
            .filter(|rest| !rest.contains('/'))
            .collect()
    }

    async fn handle(&self, req: Request<Body>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or_default().to_owned();
        // `get_metadata`: the API server answers a PartialObjectMetadata (no data, no spec)
        let metadata_only = req
            .headers()
            .get("accept")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("as=PartialObjectMetadata"));
        let body = req.into_body().collect_bytes().await.unwrap_or_default();
        let (code, mut value) = self.respond(&method, &path, &query, &body, metadata_only);
        if metadata_only && code == StatusCode::OK {
            value = json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                           "metadata": value["metadata"].clone()});
        }
        Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&value).unwrap_or_default()))
            .expect("response builds")
    }

    fn respond(
        &self,
        method: &Method,
        path: &str,
        query: &str,
        body: &[u8],
        metadata_only: bool,
    ) -> (StatusCode, Value) {
        let mut st = self.0.lock().expect("lock");
        if method == Method::GET && !metadata_only {
            st.full_reads.push(path.to_owned());
        }
        if method != Method::GET {
            st.writes.push(Write {
                method: method.to_string(),
                path: path.to_owned(),
            });
        }
        if method != Method::GET
            && st
                .fail_writes_to
                .as_deref()
                .is_some_and(|f| path.contains(f))
        {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                status_body(500, "InternalError", "etcdserver: request timed out"),
            );
        }
        if path == "/apis/monitoring.coreos.com/v1" {
            return if st.monitoring_api {
                (
                    StatusCode::OK,
                    json!({"kind": "APIResourceList", "apiVersion": "v1",
                    "groupVersion": "monitoring.coreos.com/v1", "resources": [
                    {"name": "servicemonitors", "singularName": "servicemonitor", "namespaced": true,
                     "kind": "ServiceMonitor", "verbs": ["get", "patch", "delete"]},
                    {"name": "prometheusrules", "singularName": "prometheusrule", "namespaced": true,
                     "kind": "PrometheusRule", "verbs": ["get", "patch", "delete"]}]}),
                )
            } else {
                (
                    StatusCode::NOT_FOUND,
                    status_body(
                        404,
                        "NotFound",
                        "the server could not find the requested resource",
                    ),
                )
            };
        }
        if path == "/apis/cert-manager.io/v1" {
            return if st.cert_manager_api {
                (
                    StatusCode::OK,
                    json!({"kind": "APIResourceList", "apiVersion": "v1",
                    "groupVersion": "cert-manager.io/v1", "resources": [
                    {"name": "certificates", "singularName": "certificate", "namespaced": true,
                     "kind": "Certificate", "verbs": ["get", "patch", "delete"]}]}),
                )
            } else {
                (
                    StatusCode::NOT_FOUND,
                    status_body(
                        404,
                        "NotFound",
                        "the server could not find the requested resource",
                    ),
                )
            };
        }
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
        let Some(ns_at) = segments.iter().position(|s| *s == "namespaces") else {
            return (
                StatusCode::NOT_FOUND,
                status_body(404, "NotFound", "cluster-scoped paths are not faked"),
            );
        };
        let rest = &segments[ns_at + 1..];
        match (method.clone(), rest.len()) {
            // collection: list or create
            (Method::GET, 2) => {
                let selector = label_selector(query);
                let prefix = format!("{path}/");
                let items: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|(k, _)| k.starts_with(&prefix) && !k[prefix.len()..].contains('/'))
                    .map(|(_, v)| v.clone())
                    .filter(|v| {
                        selector
                            .iter()
                            .all(|(k, want)| v["metadata"]["labels"][k].as_str() == Some(want))
                    })
                    .collect();
                (
                    StatusCode::OK,
                    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}),
                )
            }
            (Method::POST, 2) => {
                let mut obj: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                let name = obj["metadata"]["name"]
                    .as_str()
                    .unwrap_or("generated")
                    .to_owned();
                let uid = st.next_uid;
                st.next_uid += 1;
                obj["metadata"]["uid"] = json!(format!("uid-{uid}"));
                obj["metadata"]["resourceVersion"] = json!("1");
                st.objects.insert(format!("{path}/{name}"), obj.clone());
                (StatusCode::CREATED, obj)
            }
            (Method::GET, 3) => match st.objects.get(path) {
                Some(obj) => (StatusCode::OK, obj.clone()),
                None => (
                    StatusCode::NOT_FOUND,
                    status_body(404, "NotFound", "not found"),
                ),
            },
            (Method::DELETE, 3) => match st.objects.remove(path) {
                Some(_) => (
                    StatusCode::OK,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 200}),
                ),
                None => (
                    StatusCode::NOT_FOUND,
                    status_body(404, "NotFound", "not found"),
                ),
            },
            (Method::PATCH, 3) => {
                let applied: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                let kind = applied["kind"].as_str().unwrap_or_default().to_owned();
                let old = st.objects.get(path).cloned();
                let mut obj = applied.clone();
                let generation = match &old {
                    Some(old) if old["spec"] == applied["spec"] => {
                        old["metadata"]["generation"].as_i64().unwrap_or(1)
                    }
                    Some(old) => old["metadata"]["generation"].as_i64().unwrap_or(1) + 1,
                    None => 1,
                };
                let uid = match &old {
                    Some(old) => old["metadata"]["uid"].clone(),
                    None => {
                        let uid = st.next_uid;
                        st.next_uid += 1;
                        json!(format!("uid-{uid}"))
                    }
                };
                obj["metadata"]["uid"] = uid;
                obj["metadata"]["generation"] = json!(generation);
                obj["metadata"]["resourceVersion"] = json!(format!("{}", st.next_uid));
                st.next_uid += 1;
                // Keep what other actors own (status), as SSA would.
                if let Some(old) = &old
                    && !old["status"].is_null()
                {
                    obj["status"] = old["status"].clone();
                }
                match kind.as_str() {
                    "Deployment" => {
                        let r = obj["spec"]["replicas"].as_i64().unwrap_or(1);
                        obj["status"] = json!({"observedGeneration": generation, "replicas": r,
                            "readyReplicas": r, "updatedReplicas": r, "availableReplicas": r});
                    }
                    "Job" if old.is_none() => {
                        obj["status"] = match st.job_outcome {
                            JobOutcome::Complete => json!({"succeeded": 1, "conditions": [
                                {"type": "Complete", "status": "True"}]}),
                            JobOutcome::Failed => json!({"failed": 4, "conditions": [
                                {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                 "message": "Job has reached the specified backoff limit"}]}),
                            JobOutcome::Running => json!({"active": 1}),
                        };
                    }
                    _ => {}
                }
                st.objects.insert(path.to_owned(), obj.clone());
                (StatusCode::OK, obj)
            }
            (Method::PATCH, 4) if rest[3] == "status" => {
                let item = path.trim_end_matches("/status");
                let applied: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                match st.objects.get_mut(item) {
                    Some(obj) => {
                        obj["status"] = applied["status"].clone();
                        (StatusCode::OK, obj.clone())
                    }
                    None => (
                        StatusCode::NOT_FOUND,
                        status_body(404, "NotFound", "not found"),
                    ),
                }
            }
            _ => (
                StatusCode::METHOD_NOT_ALLOWED,
                status_body(405, "MethodNotAllowed", "not faked"),
            ),
        }
    }
}
