"""Writing reference.json (docs/fixtures.md): one layout for tools/make_fixtures.py (random fixtures) and
tools/train/export.py (the trained default model), so that both diff the same way: one logits row per line,
router rows per layer, floats with 9 significant digits."""

import json


def fmt(x):
    """A float rounded to 9 significant digits (round-trips float32)."""
    return float(f"{x:.9g}")


def write_reference(path, ref):
    def row(v):
        return json.dumps(v, separators=(",", ":"))
    parts = []
    for key, val in ref.items():
        if key == "logits":
            body = "[\n" + ",\n".join("  " + row(r) for r in val) + "\n ]"
        elif key in ("router_logits", "topk_ids"):
            body = "[\n" + ",\n".join("  [\n" + ",\n".join("   " + row(r) for r in layer) + "\n  ]"
                                      for layer in val) + "\n ]"
        else:
            body = row(val)
        parts.append(f" {json.dumps(key)}: {body}")
    text = "{\n" + ",\n".join(parts) + "\n}\n"
    json.loads(text)  # the writer's own check: what it wrote parses
    with open(path, "w") as f:
        f.write(text)
