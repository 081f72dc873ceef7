"""A swarm that does not finish in time is stopped, and the error says where each running node was."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from node.errors import NodeError
from node.observability.status import STATUS_FILE
from node.testing.swarm import NodeProcess, wait_nodes


@pytest.mark.timeout(60)
def test_a_hung_swarm_is_stopped_and_the_error_names_each_running_nodes_state(tmp_path: Path) -> None:
    done_dir, hung_dir = tmp_path / "node0", tmp_path / "node1"
    for d in (done_dir, hung_dir):
        d.mkdir()
    (hung_dir / STATUS_FILE).write_text(json.dumps({"state": "training", "stage": 1, "next_step": 7,
                                                    "bans": [{"event": "takeover", "step": 6}]}))
    (hung_dir / "stderr.log").write_text("starting\nwaiting for the commit of step 7\n")
    done = subprocess.Popen([sys.executable, "-c", "pass"], stdout=subprocess.PIPE)
    # a node that never exits: it blocks reading its stdin, which nobody writes or closes until the end
    hung = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    nodes = [NodeProcess(stage=0, data_dir=done_dir, proc=done), NodeProcess(stage=1, data_dir=hung_dir, proc=hung)]
    try:
        with pytest.raises(NodeError) as err:
            wait_nodes(nodes, 2)
        assert hung.poll() is not None  # stopped by wait_nodes, not left running
    finally:
        for p in (done, hung):
            p.kill()
            p.wait()
            for pipe in (p.stdin, p.stdout):
                if pipe is not None:
                    pipe.close()
    msg = str(err.value)
    assert "stage 1 still running" in msg and "node1 (stage 1)" in msg and "node0" not in msg
    assert '"next_step": 7' in msg and "takeover" in msg and "waiting for the commit of step 7" in msg
