"""Small caption tables the reliability tests write: JSONL rows, balanced so that nothing is
dropped for balance's sake."""
import json


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def balanced_rows(keys):
    """As many 'a man' as 'a woman' captions, no concepts: balanced already, so keep rate 1 keeps
    all."""
    return [{"key": key, "caption": "a man" if i % 2 else "a woman"} for i, key in enumerate(keys)]
