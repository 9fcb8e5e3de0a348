//! `apex-fake-llm`: the fake OpenAI-compatible upstream of the test suite as a process, for
//! benchmarks, demos and node tests (`apex-node --llm-upstream http://ADDR/v1`). Prints
//! `listening on http://ADDR` once bound. Behaviour: see `apex_tests::fake_llm`.

use std::net::SocketAddr;

use apex_tests::fake_llm::{FakeOptions, serve};
use clap::Parser;

/// A fake OpenAI-compatible LLM server (deterministic answers, failure knobs, counters).
#[derive(Debug, Parser)]
#[command(name = "apex-fake-llm", version)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Model listed by GET /v1/models (repeatable) [default: fake-model].
    #[arg(long = "model")]
    models: Vec<String>,
    /// API key callers must send as a bearer token.
    #[arg(long)]
    api_key: Option<String>,
    /// Do not keep request bodies for GET /fake/requests.
    #[arg(long)]
    no_record: bool,
    /// Worker threads of the runtime [default: number of CPUs].
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(t) = args.threads {
        rt.worker_threads(t.max(1));
    }
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("apex-fake-llm: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let r = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        println!("listening on http://{}", listener.local_addr()?);
        let mut opts = FakeOptions {
            listen: args.listen,
            api_key: args.api_key,
            record: !args.no_record,
            ..FakeOptions::default()
        };
        if !args.models.is_empty() {
            opts.models = args.models;
        }
        serve(listener, opts).await
    });
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("apex-fake-llm: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
