"""doc_search: a synchronous apex search plugin (nex plugin.json format, capability `search`).

Reads `{query, limit?}` as one JSON object on stdin and prints one JSON answer on stdout:
`{"status": "success", "result": {"results": [{title, source, snippet, score}], "query",
"total"}}`, best first. Standard library only.

- The root is the config value `DOC_SEARCH_ROOT` (an environment variable), by default the
  `docs/` folder beside this file. Only `.md` and `.txt` files under it are read, as UTF-8;
  a file that is not UTF-8 or is larger than MAX_FILE_BYTES is skipped.
- Nothing outside the root is read: symlinked directories are not followed, and a file whose
  resolved path leaves the root (a symlink out) is skipped.
- Score: the number of occurrences, in the document, of the query's distinct lower-cased words
  (words are runs of letters, digits and `_`). Ties go to the source path in order. A query
  that matches nothing answers an empty `results` and `total: 0`, not an error.
- `total` counts every matching document; `results` holds at most `limit` of them.
"""
import json
import os
import re
import sys

EXTENSIONS = (".md", ".txt")
MAX_FILE_BYTES = 1024 * 1024
SNIPPET_CHARS = 300
# How much of the snippet comes before the first hit.
SNIPPET_LEAD = 100
WORD = re.compile(r"\w+")
HEADING = re.compile(r"^[ \t]*#+[ \t]*", re.MULTILINE)


class BadArguments(Exception):
    pass


def parse_args(args):
    if not isinstance(args, dict):
        raise BadArguments("the arguments must be a JSON object")
    query = args.get("query")
    if not isinstance(query, str):
        raise BadArguments("`query` is required and must be a string")
    if not WORD.search(query):
        raise BadArguments("`query` is empty: give at least one word to search for")
    limit = args.get("limit", 5)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 50:
        raise BadArguments("`limit` must be an integer from 1 to 50")
    return query, limit


def root_dir():
    configured = os.environ.get("DOC_SEARCH_ROOT", "").strip()
    if configured:
        return os.path.realpath(configured)
    return os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs"))


def inside(path, root):
    return os.path.commonpath([path, root]) == root


def documents(root):
    """(relative source, text) of every readable document under `root`, in path order."""
    found = []
    # followlinks=False: a symlinked directory is listed but never entered.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.lower().endswith(EXTENSIONS):
                continue
            path = os.path.join(dirpath, name)
            real = os.path.realpath(path)
            if not inside(real, root) or not os.path.isfile(real):
                continue
            try:
                if os.path.getsize(real) > MAX_FILE_BYTES:
                    continue
                with open(real, "rb") as f:
                    text = f.read().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            found.append((os.path.relpath(path, root).replace(os.sep, "/"), text))
    return found


def title_of(source, text):
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
            if heading:
                return heading
        elif line:
            break
    stem = os.path.splitext(os.path.basename(source))[0]
    return stem.replace("_", " ").replace("-", " ")


def snippet_at(flat, start_hit):
    """At most SNIPPET_CHARS of `flat` around offset `start_hit`, cut at spaces."""
    if len(flat) <= SNIPPET_CHARS:
        return flat
    start = max(0, start_hit - SNIPPET_LEAD)
    if start > 0:
        space = flat.find(" ", start, start_hit)
        start = space + 1 if space != -1 else start
    # Room for the two ellipses.
    end = min(len(flat), start + SNIPPET_CHARS - 2)
    if end < len(flat):
        space = flat.rfind(" ", start_hit, end)
        end = space if space != -1 else end
    body = flat[start:end].strip()
    return ("…" if start > 0 else "") + body + ("…" if end < len(flat) else "")


def search(query, limit, root):
    terms = {w.lower() for w in WORD.findall(query)}
    hits = []
    for source, text in documents(root):
        # Heading markers are dropped from snippets; words are what is searched.
        flat = " ".join(HEADING.sub("", text).split())
        score = 0
        first = None
        for m in WORD.finditer(flat):
            if m.group().lower() in terms:
                score += 1
                if first is None:
                    first = m.start()
        if score:
            hits.append({
                "title": title_of(source, text),
                "source": source,
                "snippet": snippet_at(flat, first),
                "score": score,
            })
    hits.sort(key=lambda h: (-h["score"], h["source"]))
    return {"results": hits[:limit], "query": query, "total": len(hits)}


def main():
    try:
        query, limit = parse_args(json.load(sys.stdin))
    except ValueError as e:
        print(json.dumps({"status": "error", "error": f"bad arguments: not JSON: {e}"}))
        return
    except BadArguments as e:
        print(json.dumps({"status": "error", "error": f"bad arguments: {e}"}))
        return
    root = root_dir()
    if not os.path.isdir(root):
        print(json.dumps({"status": "error", "error": f"the document root {root} is not a directory (DOC_SEARCH_ROOT)"}))
        return
    print(json.dumps({"status": "success", "result": search(query, limit, root)}))


if __name__ == "__main__":
    main()
