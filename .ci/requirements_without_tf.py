"""Prints the requirements of kerasft (with the extras named) and keras-hub, without TensorFlow.

keras-hub 0.32 declares tensorflow-text (which pulls TensorFlow) on Linux, though kerasft needs
neither on JAX and PyTorch. `.ci/run` installs kerasft and keras-hub with `--no-deps`, then these.
"""

import importlib.metadata
import re
import sys

DROP = re.compile(r"^(tensorflow|tensorflow-text|tf-keras|keras-hub)\b", re.IGNORECASE)


def requirements(dist: str, extras: set[str]) -> list[str]:
    out = []
    for req in importlib.metadata.requires(dist) or []:
        spec, _, marker = req.partition(";")
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        if extra and extra.group(1) not in extras:
            continue
        if "platform_system" in marker and "Windows" in marker and "!=" not in marker:
            continue  # Windows-only
        if not DROP.match(spec.strip()):
            out.append(spec.strip())
    return out


if __name__ == "__main__":
    extras = set(sys.argv[1].split(",")) if len(sys.argv) > 1 else set()
    found = requirements("kerasft", extras) + requirements("keras-hub", set())
    print("\n".join(dict.fromkeys(found)))
