//! HTTP client for the hub's public API, with typed helpers for tasks, nodes and health.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures::{StreamExt, TryStreamExt};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

/// Task statuses after which nothing changes.
pub const TERMINAL_STATUSES: &[&str] = &["succeeded", "failed", "cancelled", "timed_out"];

/// Longest `?wait_ms` the hub accepts.
const MAX_WAIT_MS: u64 = 60_000;

/// The error part of a task: `{code, message, details?}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct TaskError {
    /// Machine-readable code.
    pub code: String,
    /// Human-readable message.
    pub message: String,
    /// Extra detail.
    pub details: Option<Value>,
}

/// A task object as the hub returns it.
#[derive(Debug, Clone, Deserialize)]
pub struct Task {
    /// Task id.
    pub task_id: String,
    /// `queued`, `assigned`, `running`, `succeeded`, `failed`, `cancelled` or `timed_out`.
    pub status: String,
    /// Tool the task runs.
    #[serde(default)]
    pub tool: String,
    /// Tool arguments.
    #[serde(default)]
    pub args: Value,
    /// The tool's output once succeeded.
    #[serde(default)]
    pub result: Value,
    /// The error once failed.
    #[serde(default)]
    pub error: Option<TaskError>,
    /// Attempt number: 0 while first queued, 1 on first assignment.
    #[serde(default)]
    pub attempt: u32,
    /// Node the current attempt runs on.
    #[serde(default)]
    pub node_id: Option<String>,
    /// Idempotency key given at submission.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// RFC 3339 creation time.
    #[serde(default)]
    pub created_at: Option<String>,
    /// RFC 3339 time of the terminal state.
    #[serde(default)]
    pub finished_at: Option<String>,
    /// Every other field.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Task {
    /// Whether the task reached a terminal state.
    pub fn is_terminal(&self) -> bool {
        TERMINAL_STATUSES.contains(&self.status.as_str())
    }
}

/// A node object from `/v1/nodes`.
#[derive(Debug, Clone, Deserialize)]
pub struct NodeInfo {
    /// Node id.
    pub id: String,
    /// Display name (`serverName` for VCP nodes).
    #[serde(default)]
    pub name: String,
    /// `native` or `vcp`.
    #[serde(default)]
    pub dialect: Option<String>,
    /// `online`, `draining` or `offline`.
    pub status: String,
    /// Tool names.
    #[serde(default)]
    pub tools: Vec<String>,
    /// Concurrency limit.
    #[serde(default)]
    pub max_concurrent_tasks: Option<u64>,
    /// Tasks running now.
    #[serde(default)]
    pub active_tasks: Option<u64>,
    /// Every other field.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Pagination facts of a list answer.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct PageMeta {
    /// Items matching the filter.
    pub total: u64,
    /// Page number, from 1.
    pub page: u64,
    /// Page size.
    pub limit: u64,
    /// Number of pages.
    pub pages: u64,
}

/// A list answer `{data, meta}`.
#[derive(Debug, Clone, Deserialize)]
pub struct Page<T> {
    /// The items.
    pub data: Vec<T>,
    /// Pagination.
    #[serde(default)]
    pub meta: PageMeta,
}

/// An HTTP client for one hub, authenticated with an API key.
#[derive(Debug, Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Api {
    /// A client for the hub at `base` (`http://ADDR`) using `api_key`.
    ///
    /// # Errors
    /// If the HTTP client cannot be built.
    pub fn new(base: &str, api_key: &str) -> Result<Self> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(90))
            .build()?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            key: api_key.to_owned(),
        })
    }

    /// `http://ADDR`.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The API key in use.
    pub fn api_key(&self) -> &str {
        &self.key
    }

    /// The underlying client, for requests without the key.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// A request to `path` (starting with `/`) with the API key.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key)
    }

    /// Registers the user `email` (`POST /api/v1/auth/register`, a fixed password) at the hub
    /// at `base` and returns a client with their access token (also [`Api::api_key`]).
    ///
    /// # Errors
    /// On a transport error or a refused registration (the error has the body).
    pub async fn register_user(base: &str, email: &str) -> Result<Self> {
        let http = reqwest::Client::new();
        let resp = http
            .post(format!(
                "{}/api/v1/auth/register",
                base.trim_end_matches('/')
            ))
            .json(&json!({"email": email, "password": "correct horse battery",
                "username": email}))
            .send()
            .await?;
        let (status, body) = json_of(resp).await?;
        if status != StatusCode::CREATED {
            bail!("registering {email}: HTTP {status}: {body}");
        }
        let token = body["access_token"]
            .as_str()
            .ok_or_else(|| anyhow!("no access_token in {body}"))?;
        Self::new(base, token)
    }

    /// `POST /api/v1/tasks`: the status code and body as received.
    ///
    /// # Errors
    /// On a transport error or a body that is not JSON.
    pub async fn submit_raw(&self, body: &Value) -> Result<(StatusCode, Value)> {
        let resp = self
            .request(Method::POST, "/api/v1/tasks")
            .json(body)
            .send()
            .await?;
        json_of(resp).await
    }

    /// `POST /api/v1/tasks`, expecting 201 (or 200 for a known idempotency key).
    ///
    /// # Errors
    /// On any other status or a body that is not a task.
    pub async fn submit(&self, body: &Value) -> Result<Task> {
        let (status, v) = self.submit_raw(body).await?;
        if status != StatusCode::CREATED && status != StatusCode::OK {
            bail!("POST /api/v1/tasks answered {status}: {v}");
        }
        serde_json::from_value(v.clone()).with_context(|| format!("not a task object: {v}"))
    }

    /// `POST /api/v1/tasks/batch` with up to 1,000 task bodies, expecting 201.
    ///
    /// # Errors
    /// On another status or a body that is not `{"data": [tasks]}`.
    pub async fn submit_batch(&self, tasks: &[Value]) -> Result<Vec<Task>> {
        let resp = self
            .request(Method::POST, "/api/v1/tasks/batch")
            .json(&json!({ "tasks": tasks }))
            .send()
            .await?;
        let (status, v) = json_of(resp).await?;
        if status != StatusCode::CREATED {
            bail!("POST /api/v1/tasks/batch answered {status}: {v}");
        }
        let page: Page<Task> =
            serde_json::from_value(v).context("batch answer is not {\"data\": [tasks]}")?;
        if page.data.len() != tasks.len() {
            bail!(
                "batch of {} tasks answered with {} tasks",
                tasks.len(),
                page.data.len()
            );
        }
        Ok(page.data)
    }

    /// Submits a batch (as [`Api::submit_batch`]) and returns just the task ids, in order.
    ///
    /// # Errors
    /// See [`Api::submit_batch`].
    pub async fn submit_ids(&self, tasks: &[Value]) -> Result<Vec<String>> {
        Ok(self
            .submit_batch(tasks)
            .await?
            .into_iter()
            .map(|t| t.task_id)
            .collect())
    }

    /// Submits any number of task bodies in batches of 1,000.
    ///
    /// # Errors
    /// See [`Api::submit_batch`].
    pub async fn submit_many(&self, tasks: &[Value]) -> Result<Vec<Task>> {
        let mut out = Vec::with_capacity(tasks.len());
        for chunk in tasks.chunks(1000) {
            out.extend(self.submit_batch(chunk).await?);
        }
        Ok(out)
    }

    /// `GET /api/v1/tasks/{id}`.
    ///
    /// # Errors
    /// On a non-200 answer.
    pub async fn get(&self, id: &str) -> Result<Task> {
        self.get_json(&format!("/api/v1/tasks/{id}")).await
    }

    /// `GET /api/v1/tasks/{id}?wait_ms=N`: answers when the task is terminal or after `N` ms.
    ///
    /// # Errors
    /// On a non-200 answer.
    pub async fn get_wait(&self, id: &str, wait_ms: u64) -> Result<Task> {
        self.get_json(&format!(
            "/api/v1/tasks/{id}?wait_ms={}",
            wait_ms.min(MAX_WAIT_MS)
        ))
        .await
    }

    /// Long-polls a task until it is terminal.
    ///
    /// # Errors
    /// If it is not terminal within `timeout`.
    pub async fn wait_terminal(&self, id: &str, timeout: Duration) -> Result<Task> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let wait_ms = (left.as_millis() as u64).clamp(1, 10_000);
            let task = self.get_wait(id, wait_ms).await?;
            if task.is_terminal() {
                return Ok(task);
            }
            if Instant::now() >= deadline {
                bail!(
                    "task {id} not terminal after {timeout:?}: status {} attempt {} node {:?}",
                    task.status,
                    task.attempt,
                    task.node_id
                );
            }
        }
    }

    /// Waits for every task in `ids` to be terminal, `concurrency` long-polls at a time, and
    /// returns them in the order of `ids`.
    ///
    /// # Errors
    /// If any task is not terminal within `timeout`.
    pub async fn wait_all_terminal(
        &self,
        ids: &[String],
        timeout: Duration,
        concurrency: usize,
    ) -> Result<Vec<Task>> {
        futures::stream::iter(ids.iter().map(|id| self.wait_terminal(id, timeout)))
            .buffered(concurrency.max(1))
            .try_collect()
            .await
    }

    /// `GET /api/v1/tasks?...` with the given query pairs.
    ///
    /// # Errors
    /// On a non-200 answer or a body that is not a page of tasks.
    pub async fn list(&self, query: &[(&str, &str)]) -> Result<Page<Task>> {
        let resp = self
            .request(Method::GET, "/api/v1/tasks")
            .query(query)
            .send()
            .await?;
        let (status, v) = json_of(resp).await?;
        if status != StatusCode::OK {
            bail!("GET /api/v1/tasks answered {status}: {v}");
        }
        serde_json::from_value(v).context("task list is not {data, meta}")
    }

    /// Every task matching `query`, walking all pages (100 per page).
    ///
    /// # Errors
    /// See [`Api::list`].
    pub async fn list_all(&self, query: &[(&str, &str)]) -> Result<Vec<Task>> {
        let mut out = Vec::new();
        let mut page = 1u64;
        loop {
            let p = page.to_string();
            let mut q: Vec<(&str, &str)> = query.to_vec();
            q.push(("page", &p));
            q.push(("limit", "100"));
            let got = self.list(&q).await?;
            let n = got.data.len();
            out.extend(got.data);
            if n == 0 || page >= got.meta.pages {
                return Ok(out);
            }
            page += 1;
        }
    }

    /// `POST /api/v1/tasks/{id}/cancel`: the status code and body as received.
    ///
    /// # Errors
    /// On a transport error or a body that is not JSON.
    pub async fn cancel(&self, id: &str) -> Result<(StatusCode, Value)> {
        let resp = self
            .request(Method::POST, &format!("/api/v1/tasks/{id}/cancel"))
            .send()
            .await?;
        json_of(resp).await
    }

    /// Reads `GET /api/v1/tasks/{id}/events` to its end and returns the `data` of every event.
    ///
    /// # Errors
    /// On a non-200 answer, a `data` line that is not JSON, or if the stream does not end
    /// within `timeout`.
    pub async fn events(&self, id: &str, timeout: Duration) -> Result<Vec<Value>> {
        Ok(self
            .events_named(id, timeout)
            .await?
            .into_iter()
            .map(|(_, data)| data)
            .collect())
    }

    /// As [`Api::events`], with each event's `event:` name beside its data.
    ///
    /// # Errors
    /// See [`Api::events`].
    pub async fn events_named(&self, id: &str, timeout: Duration) -> Result<Vec<(String, Value)>> {
        let read = async {
            let resp = self
                .request(Method::GET, &format!("/api/v1/tasks/{id}/events"))
                .send()
                .await?;
            if resp.status() != StatusCode::OK {
                let status = resp.status();
                let body = resp.text().await.unwrap_or_default();
                bail!("GET events of {id} answered {status}: {body}");
            }
            let mut parser = SseParser::default();
            let mut body = resp.bytes_stream();
            while let Some(chunk) = body.next().await {
                parser.push(&chunk?)?;
            }
            parser.finish()?;
            Ok(parser.events)
        };
        tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| anyhow!("event stream of task {id} did not end within {timeout:?}"))?
    }

    /// `GET /v1/nodes`: every node the hub knows.
    ///
    /// # Errors
    /// On a non-200 answer or a body that is not a page of nodes.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>> {
        let page: Page<NodeInfo> = self.get_json("/v1/nodes").await?;
        Ok(page.data)
    }

    /// `GET /v1/nodes/{id}`; `None` on 404.
    ///
    /// # Errors
    /// On another non-200 answer.
    pub async fn node(&self, id: &str) -> Result<Option<NodeInfo>> {
        let resp = self
            .request(Method::GET, &format!("/v1/nodes/{id}"))
            .send()
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let (status, v) = json_of(resp).await?;
        if status != StatusCode::OK {
            bail!("GET /v1/nodes/{id} answered {status}: {v}");
        }
        Ok(Some(
            serde_json::from_value(v).context("not a node object")?,
        ))
    }

    /// `GET /health` (no key needed).
    ///
    /// # Errors
    /// On a non-200 answer.
    pub async fn health(&self) -> Result<Value> {
        let resp = self
            .http
            .get(format!("{}/health", self.base))
            .send()
            .await?;
        let (status, v) = json_of(resp).await?;
        if status != StatusCode::OK {
            bail!("GET /health answered {status}: {v}");
        }
        Ok(v)
    }

    /// A GET with the key, expecting 200 and a JSON body of type `T`.
    ///
    /// # Errors
    /// On a non-200 answer or a body of another shape.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let resp = self.request(Method::GET, path).send().await?;
        let (status, v) = json_of(resp).await?;
        if status != StatusCode::OK {
            bail!("GET {path} answered {status}: {v}");
        }
        serde_json::from_value(v.clone())
            .with_context(|| format!("unexpected body of GET {path}: {v}"))
    }
}

/// The event types of a task's stream (`GET /api/v1/tasks/{id}/events`), checked to hold
/// exactly one terminal event and to end with `task_completed`: a task that succeeded once.
///
/// # Errors
/// When the events show no terminal event, several, or a last one other than `task_completed`.
pub fn completed_once<'a>(task_id: &str, events: &'a [Value]) -> Result<Vec<&'a str>> {
    let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    let terminal = types
        .iter()
        .filter(|ty| {
            matches!(
                **ty,
                "task_completed" | "task_failed" | "task_cancelled" | "task_timed_out"
            )
        })
        .count();
    anyhow::ensure!(
        terminal == 1 && types.last() == Some(&"task_completed"),
        "task {task_id} events {types:?}: want exactly one terminal event, task_completed"
    );
    Ok(types)
}

/// The status and JSON body of a response (`Value::Null` for an empty body).
///
/// # Errors
/// On a transport error or a non-empty body that is not JSON.
pub async fn json_of(resp: reqwest::Response) -> Result<(StatusCode, Value)> {
    let status = resp.status();
    let bytes = resp.bytes().await?;
    if bytes.is_empty() {
        return Ok((status, Value::Null));
    }
    let v = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{status} answer is not JSON: {}",
            String::from_utf8_lossy(&bytes)
        )
    })?;
    Ok((status, v))
}

/// One request of `api` (`body` sent as JSON when given): the status and the body, parsed as
/// JSON or else kept as a JSON string. For tests: panics if the request cannot be sent.
///
/// # Panics
/// When the hub cannot be reached or the body cannot be read.
#[allow(clippy::unwrap_used)]
pub async fn call(
    api: &Api,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = api.request(method, path);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// An incremental Server-Sent Events parser keeping `(event name, data as JSON)`.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    name: String,
    data: String,
    id: String,
    /// Events parsed so far.
    pub events: Vec<(String, Value)>,
    /// The SSE `id` of each of [`SseParser::events`] (empty when it had none).
    pub ids: Vec<String>,
}

impl SseParser {
    /// Feeds a chunk of the body.
    ///
    /// # Errors
    /// If an event's data is not JSON.
    pub fn push(&mut self, chunk: &[u8]) -> Result<()> {
        self.buf.extend_from_slice(chunk);
        while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line);
            self.line(line.trim_end_matches(['\n', '\r']))?;
        }
        Ok(())
    }

    /// Ends the stream: dispatches a last event not followed by a blank line.
    ///
    /// # Errors
    /// If that event's data is not JSON.
    pub fn finish(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            let rest = String::from_utf8_lossy(&std::mem::take(&mut self.buf)).into_owned();
            self.line(rest.trim_end_matches('\r'))?;
        }
        self.line("")
    }

    fn line(&mut self, line: &str) -> Result<()> {
        if line.is_empty() {
            if !self.data.is_empty() {
                let data = std::mem::take(&mut self.data);
                let v: Value = serde_json::from_str(&data)
                    .with_context(|| format!("event data is not JSON: {data}"))?;
                self.events.push((std::mem::take(&mut self.name), v));
                self.ids.push(std::mem::take(&mut self.id));
            }
            self.name.clear();
            self.id.clear();
            return Ok(());
        }
        if line.starts_with(':') {
            return Ok(());
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.name = value.to_owned(),
            "id" => self.id = value.to_owned(),
            "data" => {
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(value);
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_parser_handles_split_chunks_and_comments() -> Result<()> {
        let mut p = SseParser::default();
        p.push(b": hello\n\nevent: task_created\r\ndata: {\"ty")?;
        p.push(b"pe\":\"task_created\"}\r\n\r\nevent: task_completed\ndata: {\"a\":1}")?;
        p.finish()?;
        assert_eq!(p.events.len(), 2);
        assert_eq!(p.events[0].0, "task_created");
        assert_eq!(p.events[0].1["type"], "task_created");
        assert_eq!(p.events[1].0, "task_completed");
        assert_eq!(p.events[1].1["a"], 1);
        Ok(())
    }
}
