"""The job store's lifetime rules on a real ``wanlite serve`` process (micro random model):
paging of the listing (``limit``, ``before``) and retention (``--retention``: finished jobs and
their files are deleted once old, at start and periodically; active ones never; 0 keeps all).
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_server import CLEAN_EXIT, SMALL, Server  # noqa: E402

SLOW = {"height": 320, "width": 320, "num_frames": 33, "num_inference_steps": 100}  # ~8 s


def micro(data_dir, *extra: str, port: int | None = None) -> Server:
    s = Server(data_dir, model="random:micro", extra=extra, port=port)
    return s.start().wait_ready(timeout=300)


def listing(s: Server, query: str) -> dict:
    r = s.req("GET", f"/api/ai/queue?{query}")
    assert r.status_code == 200, r.text
    return r.json()


def test_listing_pages_with_limit_and_before(tmp_path):
    s = micro(tmp_path / "data")
    try:
        ids = s.enqueue(4) + s.enqueue()  # the queue order is the enqueue order
        first = listing(s, "status=all&limit=2")
        assert [g["generation_id"] for g in first["generations"]] == ids[3:]  # newest, oldest first
        assert first["count"] == 2 and first["has_more"] is True
        second = listing(s, f"status=all&limit=2&before={first['next_before']}")
        assert [g["generation_id"] for g in second["generations"]] == ids[1:3]
        last = listing(s, f"status=all&limit=2&before={second['next_before']}")
        assert [g["generation_id"] for g in last["generations"]] == ids[:1]
        assert last["has_more"] is False and last["next_before"] is None
        whole = listing(s, "status=all")  # default limit 1000
        assert [g["generation_id"] for g in whole["generations"]] == ids and not whole["has_more"]
        for query in ("limit=0", "limit=1001", "limit=x", "before=-1", "before=x"):
            r = s.req("GET", f"/api/ai/queue?status=all&{query}")
            assert r.status_code == 400, (query, r.text)
            assert r.json()["error"]["param"] == query.split("=")[0]
        for gen_id in ids:
            s.wait(gen_id)
    finally:
        assert s.stop() in CLEAN_EXIT, s.log_tail()


def finished_job(s: Server) -> tuple[str, object]:
    gen_id = s.enqueue(**SMALL)[0]
    assert s.wait(gen_id)["status"] == "succeeded"
    result = s.data_dir / "results" / f"{gen_id}.mp4"
    assert result.is_file()
    return gen_id, result


def test_retention_deletes_old_finished_jobs_and_their_files(tmp_path):
    # --retention 0 keeps everything, however old
    s = micro(tmp_path / "data", "--retention", "0")
    try:
        kept, kept_file = finished_job(s)
        time.sleep(3)
        assert s.req("GET", f"/api/ai/queue/{kept}").status_code == 200 and kept_file.is_file()
        assert s.req("GET", f"/v1/videos/{kept}").json()["expires_at"] is None
    finally:
        assert s.stop() in CLEAN_EXIT, s.log_tail()

    # a 2 s retention: the 3 s old job goes at start; a new one 2 s after it finished
    s = micro(tmp_path / "data", "--retention", "2", port=s.port)
    try:
        assert s.req("GET", f"/api/ai/queue/{kept}").status_code == 404
        assert not kept_file.exists()
        gen_id, result = finished_job(s)
        running = s.enqueue(**SLOW)[0]  # an active job is never purged, however long it runs
        video = s.req("GET", f"/v1/videos/{gen_id}").json()
        assert video["expires_at"] == video["completed_at"] + 2
        deadline = time.monotonic() + 15
        while s.req("GET", f"/api/ai/queue/{gen_id}").status_code == 200:
            assert time.monotonic() < deadline, "not purged"
            time.sleep(0.2)
        assert not result.exists()
        assert s.req("GET", f"/api/ai/results/{gen_id}.mp4").status_code == 404
        d = s.status(running)  # it outlived a purge (the finished job's)
        assert d["status"] in ("queued", "processing"), d
        s.req("DELETE", f"/api/ai/queue/{running}")
        assert s.wait(running)["status"] == "cancelled"
        assert any(r["msg"] == "retention: generations deleted" for r in s.log_records())
    finally:
        assert s.stop() in CLEAN_EXIT, s.log_tail()


def test_negative_retention_is_refused_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", "wanlite.server", "--model", "random:micro", "--retention", "-1"]
    cmd += ["--data-dir", str(tmp_path / "data")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--retention must be 0" in out.stderr, out.stderr
