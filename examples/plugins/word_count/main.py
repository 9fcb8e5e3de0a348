"""word_count: a synchronous apex plugin (nex plugin.json format).

Reads its arguments as one JSON object on stdin and prints one JSON answer on stdout.
"""
import json
import os
import sys


def main() -> None:
    try:
        args = json.load(sys.stdin)
        text = args["text"]
        if not isinstance(text, str):
            raise TypeError("`text` must be a string")
    except (ValueError, KeyError, TypeError) as e:
        print(json.dumps({"status": "error", "error": f"bad arguments: {e}"}))
        return
    words = text.split()
    if os.environ.get("WORD_COUNT_LOWERCASE") == "1":
        distinct = {w.lower() for w in words}
    else:
        distinct = set(words)
    result = {
        "words": len(words),
        "distinct_words": len(distinct),
        "lines": len(text.splitlines()),
        "characters": len(text),
    }
    print(json.dumps({
        "status": "success",
        "result": result,
        "messageForAI": f"The text has {len(words)} words.",
    }))


if __name__ == "__main__":
    main()
