"""mkdocs hook: ship the mermaid renderer inside the site, so diagrams render offline.

mkdocs-material renders ``pre.mermaid`` blocks with the global ``mermaid`` object
and, when there is none, loads it from a CDN: offline, a page then shows the raw
diagram source. This hook puts ``mermaid.min.js`` from the npm package ``mermaid``
(fetched once with ``npm pack`` from the npm registry, checked against the pinned
integrity below, kept under ``.cache/``) into the site and loads it on every page,
so the theme finds ``mermaid`` already defined and fetches nothing.
"""

from __future__ import annotations

import base64
import hashlib
import io
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

# mkdocs-material's integration targets mermaid 11. To update: `npm view mermaid@11
# version`, then `npm pack mermaid@<version> --json` prints the tarball's integrity.
MERMAID_VERSION = "11.17.2"
MERMAID_INTEGRITY = "sha512-V6K3C8EBdEsPFZXSKMJe6ppQOENxuHARr9GvHX4hh47lAbhMRD9qf4oEK7LoaRQxULMa80/qt5gHO73aCleBBg=="
SITE_DIR = "assets/javascripts/mermaid"
FILES = {"package/dist/mermaid.min.js": "mermaid.min.js", "package/LICENSE": "LICENSE"}


def vendored(root: Path) -> Path:
    """The directory holding ``mermaid.min.js`` and its LICENSE, fetched on first use.

    Raises ``PluginError`` with what to do if npm is missing, the fetch fails, or
    the tarball does not match the pinned integrity.
    """
    target = root / ".cache" / "mermaid" / MERMAID_VERSION
    if all((target / name).exists() for name in FILES.values()):
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise PluginError(
            "the docs ship mermaid from the npm package, and npm is not installed: "
            "install Node.js and npm (Debian: apt-get install npm), then build again"
        )
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [npm, "pack", f"mermaid@{MERMAID_VERSION}", "--pack-destination", tmp, "--silent"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        tarball = Path(tmp) / f"mermaid-{MERMAID_VERSION}.tgz"
        if proc.returncode != 0 or not tarball.exists():
            raise PluginError(
                f"npm pack mermaid@{MERMAID_VERSION} failed: {proc.stderr.strip()[-500:]}"
            )
        data = tarball.read_bytes()
        digest = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
        if digest != MERMAID_INTEGRITY:
            raise PluginError(
                f"mermaid-{MERMAID_VERSION}.tgz has integrity {digest}, expected "
                f"{MERMAID_INTEGRITY}; refusing to ship it"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for member, name in FILES.items():
                source = tar.extractfile(member)
                if source is None:
                    raise PluginError(f"mermaid-{MERMAID_VERSION}.tgz has no {member}")
                (staging / name).write_bytes(source.read())
    try:
        staging.rename(target)  # atomic: a concurrent build sees all files or none
    except OSError:  # another build got there first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def on_config(config: Any) -> Any:
    script = f"{SITE_DIR}/mermaid.min.js"
    if script not in config.extra_javascript:
        config.extra_javascript.append(script)
    return config


def on_files(files: Files, config: Any) -> Files:
    source = vendored(Path(config.config_file_path).parent)
    for name in FILES.values():
        files.append(File.generated(config, f"{SITE_DIR}/{name}", abs_src_path=str(source / name)))
    return files
