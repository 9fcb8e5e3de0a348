//! Test harness for apex: starts the real `apex-hub` and `apex-node` binaries on loopback,
//! talks to them over HTTP ([`Api`]) and over the raw node channel ([`RawNode`]), and waits on
//! readiness by polling instead of sleeping.
//!
//! Used by the end-to-end tests in `tests/tests/`, the demo driver (`apex-demo`) and the bench
//! driver (`apex-bench`).
//!
//! Binaries are looked up in `$APEX_BIN_DIR` if it is set, else in the `target/<profile>`
//! directory of the running executable (test executables live in `target/<profile>/deps`).
//! Build them first: `cargo build --workspace`.

pub mod api;
pub mod client_ws;
pub mod fake_llm;
pub mod fixtures;
pub mod process;
pub mod redis;
pub mod shared;
pub mod stats;
pub mod tls;
pub mod wait;
pub mod ws;

pub use api::{Api, NodeInfo, Page, PageMeta, Task, TaskError};
pub use client_ws::ClientWs;
pub use process::{Hub, HubOptions, Node, NodeOptions, bin_dir};
pub use redis::RedisServer;
pub use wait::{DEFAULT_TIMEOUT, wait_until};
pub use ws::{RawNode, Received, register_msg};
