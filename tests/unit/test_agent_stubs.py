"""The committed gRPC stubs are what agent.proto generates.

Regenerate with: python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. vmrun/agent/agent.proto
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_stubs_are_current(tmp_path):
    pytest.importorskip("grpc_tools")
    (tmp_path / "vmrun" / "agent").mkdir(parents=True)
    shutil.copy(ROOT / "vmrun/agent/agent.proto", tmp_path / "vmrun/agent/agent.proto")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--grpc_python_out=.",
                    "vmrun/agent/agent.proto"], cwd=tmp_path, check=True)
    for name in ("agent_pb2.py", "agent_pb2_grpc.py"):
        assert (tmp_path / "vmrun/agent" / name).read_bytes() == (ROOT / "vmrun/agent" / name).read_bytes(), (
            f"{name} is stale: regenerate it (see this test's docstring)")
