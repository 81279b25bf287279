"""``wanlite serve --previews N``: progress events carry a small JPEG data URL of the current
prediction every N steps (opt-in per server: the hosted request schema has no such field).
A real server process, as in test_server.py."""

from __future__ import annotations

import base64
import io
import json
import threading

import pytest
from test_server import AUTH, CLEAN_EXIT, Server  # noqa: I001 - the helper of test_server.py

requests = pytest.importorskip("requests")
Image = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def preview_server(tiny_checkpoint, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("previews") / "data", extra=("--previews", "2"))
    s.start().wait_ready()
    yield s
    assert s.stop() in CLEAN_EXIT, s.log_tail()


def _listen(server: Server, events: list, done: threading.Event, gen_id: list):
    stream = requests.get(server.base + "/api/events", headers=AUTH, stream=True, timeout=60)

    def run():  # closes the stream itself
        name = None
        with stream:
            for line in stream.iter_lines(decode_unicode=True):
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    data = json.loads(line.removeprefix("data: "))
                    events.append((name, data))
                    ours = gen_id and data.get("generation_id") == gen_id[0]
                    if name == "media_generation_completed" and ours:
                        done.set()
                        return

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_progress_events_carry_previews_every_n_steps(preview_server):
    events: list[tuple[str, dict]] = []
    done, gen_id = threading.Event(), []
    listener = _listen(preview_server, events, done, gen_id)
    params = dict(height=40, width=56, num_frames=5, num_inference_steps=4)
    gen_id.append(preview_server.enqueue(**params)[0])
    assert done.wait(180), preview_server.log_tail()
    listener.join(10)
    steps = [
        d for n, d in events if n == "media_generation_progress" and d["generation_id"] == gen_id[0]
    ]
    by_step = {d["step"]: d for d in steps}
    assert {1, 2, 3, 4} <= set(by_step)
    assert [s for s in (1, 2, 3, 4) if "preview" in by_step[s]] == [2, 4]  # every 2nd step
    for s in (2, 4):
        url = by_step[s]["preview"]
        assert url.startswith("data:image/jpeg;base64,") and len(url) < 60_000
        img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert img.format == "JPEG" and img.size == (56, 40)  # the request's size (< 256 px)
    assert preview_server.status(gen_id[0])["status"] == "succeeded"


def test_previews_are_off_unless_asked():
    import argparse

    from wanlite.server import add_parser
    from wanlite.server.context import ServerConfig

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["serve"]).previews == 0 and ServerConfig().previews == 0
    assert parser.parse_args(["serve", "--previews"]).previews == 5
    assert parser.parse_args(["serve", "--previews", "3", "--port", "9"]).previews == 3
