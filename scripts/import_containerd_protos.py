#!/usr/bin/env python3
"""Copy the containerd .proto files the shim v2 speaks into vmrun/shimv2/proto/ and
compile them (grpcio-tools), as vmrun/agent/agent.proto is compiled.

The sources are Debian's Go development packages (containerd 1.6, its cgroups module):
    apt-get install golang-github-containerd-containerd-dev golang-github-containerd-cgroups-dev
Their license (Apache-2.0, "The containerd Authors") stays at the top of each file. What
only Go's code generators read is removed: gogoproto and fieldpath imports and options.
Messages keep their packages and names, so what travels (type URLs in Any, service and
method names) is containerd's. The output is committed; CI does not run this.

    python3 scripts/import_containerd_protos.py
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

GOCODE = Path("/usr/share/gocode/src/github.com/containerd")
REPO = Path(__file__).resolve().parent.parent
TARGET = Path("vmrun/shimv2/proto")  # relative to REPO: also the protoc import path

# import path as containerd writes it -> (source file, our file name)
PROTOS = {
    "github.com/containerd/containerd/runtime/v2/task/shim.proto":
        (GOCODE / "containerd/runtime/v2/task/shim.proto", "shim.proto"),
    "github.com/containerd/containerd/api/types/mount.proto":
        (GOCODE / "containerd/api/types/mount.proto", "mount.proto"),
    "github.com/containerd/containerd/api/types/task/task.proto":
        (GOCODE / "containerd/api/types/task/task.proto", "task_types.proto"),
    "github.com/containerd/containerd/api/events/task.proto":
        (GOCODE / "containerd/api/events/task.proto", "task_events.proto"),
    "github.com/containerd/containerd/api/services/ttrpc/events/v1/events.proto":
        (GOCODE / "containerd/api/services/ttrpc/events/v1/events.proto", "events_ttrpc.proto"),
    "github.com/containerd/cgroups/v2/stats/metrics.proto":
        (GOCODE / "cgroups/v2/stats/metrics.proto", "cgroups_v2_metrics.proto"),
}

_LICENSE = """/*
	Copyright The containerd Authors.

	Licensed under the Apache License, Version 2.0 (the "License");
	you may not use this file except in compliance with the License.
	You may obtain a copy of the License at

		http://www.apache.org/licenses/LICENSE-2.0

	Unless required by applicable law or agreed to in writing, software
	distributed under the License is distributed on an "AS IS" BASIS,
	WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
	See the License for the specific language governing permissions and
	limitations under the License.
*/
"""

_GO_ONLY_IMPORT = re.compile(r'^\s*import\s+(weak\s+)?"(gogoproto/gogo\.proto|github\.com/containerd/containerd/'
                             r'protobuf/plugin/fieldpath\.proto)";\n', re.M)
_GO_ONLY_OPTION = re.compile(r"^\s*option\s+\((gogoproto|containerd\.plugin)\.[^;]*;\n", re.M)
_GO_ONLY_FIELD_OPTIONS = re.compile(r"\s*\[\s*\((gogoproto|containerd\.plugin)\.[^\]]*\]")


def convert(text: str, source: Path) -> str:
    text = _GO_ONLY_IMPORT.sub("", text)
    text = _GO_ONLY_OPTION.sub("", text)
    text = _GO_ONLY_FIELD_OPTIONS.sub("", text)
    for import_path, (_, name) in PROTOS.items():
        text = text.replace(f'"{import_path}"', f'"{TARGET / name}"')
    if "gogoproto" in text or "containerd.plugin" in text:
        raise SystemExit(f"{source}: a Go-only option is left; extend the patterns")
    if "Licensed under the Apache License" not in text:
        text = _LICENSE + "\n" + text  # the cgroups module's files carry it in its LICENSE only
    note = (f"// Copied from {source} (Debian's Go development package) by\n"
            "// scripts/import_containerd_protos.py: Go-only gogoproto/fieldpath options removed.\n")
    return note + text


def main() -> int:
    out = REPO / TARGET
    out.mkdir(parents=True, exist_ok=True)
    (out / "__init__.py").write_text('"""containerd\'s protocol buffers (scripts/import_containerd_protos.py)."""\n')
    for source, name in PROTOS.values():
        if not source.is_file():
            raise SystemExit(f"{source} is missing: apt-get install golang-github-containerd-containerd-dev "
                             "golang-github-containerd-cgroups-dev")
        (out / name).write_text(convert(source.read_text(), source))
    names = [str(TARGET / name) for _, name in PROTOS.values()]
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", *names], cwd=REPO,
                   check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
