"""slow_report: an asynchronous apex plugin (VCP plugin-manifest.json format).

Called by apex-node with the arguments on stdin, it answers at once with a pending status and
starts a detached worker (a new session, so the node's process-group cleanup leaves it alone).
The worker does the slow part and POSTs the result to APEX_CALLBACK_URL, signed with
APEX_CALLBACK_SECRET: header X-Apex-Signature = "sha256=" + hex HMAC-SHA256 of
"<timestamp>.<body>", header X-Apex-Timestamp = the Unix time in seconds.
"""
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import urllib.request


def callback(body: dict) -> None:
    url = os.environ["APEX_CALLBACK_URL"]
    secret = os.environ["APEX_CALLBACK_SECRET"].encode()
    raw = json.dumps(body).encode()
    ts = str(int(time.time()))
    sig = hmac.new(secret, ts.encode() + b"." + raw, hashlib.sha256).hexdigest()
    req = urllib.request.Request(url, data=raw, method="POST", headers={
        "Content-Type": "application/json",
        "X-Apex-Timestamp": ts,
        "X-Apex-Signature": "sha256=" + sig,
    })
    # The hub answers 200 also when the task already ended; retry a few times on errors.
    for attempt in range(5):
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                resp.read()
                return
        except Exception as e:  # noqa: BLE001 - a worker has no one to report to
            print(f"slow_report: callback attempt {attempt + 1} failed: {e}", file=sys.stderr)
            time.sleep(1 + attempt)


def worker(args: dict) -> None:
    time.sleep(float(args.get("seconds", 2)))
    topic = str(args.get("topic", ""))
    if args.get("fail"):
        callback({"status": "failed", "error": f"no sources found on {topic!r}"})
        return
    report = f"Report on {topic}: {len(topic.split())} word topic, written in {args.get('seconds', 2)} s."
    callback({"status": "success", "output": {"topic": topic, "report": report}})


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
        return
    try:
        args = json.load(sys.stdin)
        if not isinstance(args.get("topic"), str):
            raise ValueError("`topic` (a string) is required")
    except ValueError as e:
        print(json.dumps({"status": "error", "error": str(e)}))
        return
    subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(args)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    print(json.dumps({"status": "success",
                      "result": {"taskId": os.environ.get("APEX_TASK_ID"), "status": "pending"}}))


if __name__ == "__main__":
    main()
