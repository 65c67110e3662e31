"""The services as their documentation says they answer (issue 41), against the stand-ins on 127.0.0.1
(tests/provider_server.py, tests/fault_server.py, each citing the page it follows): the model a row is labelled
with is the one asked for, answers of the documented sizes are kept, terminal states end a task, moderation is a
refusal, seeds and model versions are recorded per image, a finished task is never paid for twice, one task id
is never filed under two prompts, and every billed image is counted, kept or not."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fault_server import KEY as OPENAI_KEY
from fault_server import FaultServer
from provider_server import ProviderServer
from test_providers import _generate, _suite

from conftest import genbench
from pipeline.data.generated import read_meta


def _meta(out, prompt_id):
    return read_meta(out, prompt_id.replace(" ", "-"))


def _totals(out):
    return json.loads((out / "generation.json").read_text())["totals"]


def test_firefly_asks_for_the_model_it_is_labelled_with_and_records_each_seed(tmp_path):
    suite = _suite(tmp_path, ["a plain digit", "an unsafe digit", "a jobunsafe digit", "a timeout digit"])
    out = tmp_path / "ff"
    with ProviderServer() as server:
        first = _generate(server, "firefly", suite, out, "--model", "image4_ultra", "--images-per-prompt", "1")
        versions = {t["prompt"]: t["model_version"] for t in server.tasks.values()}
        assert first.returncode == 1 and "2 refused" in first.stdout and "1 failed" in first.stdout, \
            first.stdout + first.stderr[-2000:]
        assert set(versions.values()) == {"image4_ultra"}  # the x-model-version header: not the default image3
        image = _meta(out, "a plain digit")["images"][0]
        task = server.tasks[image["task_id"]]
        assert image["model_version"] == "image4_ultra" and image["seed"] == task["seed"]
        # moderation: a 422 prompt_unsafe and a job failed output_media_unsafe are refusals, not a stop or a retry
        assert _meta(out, "an unsafe digit")["refused"][0]["code"] == "prompt_unsafe"
        assert _meta(out, "a jobunsafe digit")["refused"][0]["code"] == "output_media_unsafe"
        # a job that ended `timeout` failed (submitted again by the next run), not pending forever
        assert "ended timeout" in _meta(out, "a timeout digit")["failed"][0]["error"]
        assert _meta(out, "a timeout digit")["pending"] == []
        again = _generate(server, "firefly", suite, out, "--model", "image4_ultra", "--images-per-prompt", "1")
        assert again.returncode == 1 and server.paid[("firefly", "a timeout digit")] == 2
        assert server.paid[("firefly", "a jobunsafe digit")] == 1  # a refusal is not asked again
        unknown = _generate(server, "firefly", suite, tmp_path / "x", "--model", "firefly-image-4")
        assert unknown.returncode == 2 and "x-model-version" in unknown.stderr, unknown.stderr[-2000:]


def test_stability_keeps_its_documented_sizes_sends_a_seed_and_names_the_model(tmp_path):
    suite = _suite(tmp_path, ["a plain digit"])
    with ProviderServer() as server:
        for size, ratio, pixels in (("1500x1000", "3:2", (1216, 832)), ("2100x900", "21:9", (1536, 640)),
                                    ("1216x832", "3:2", (1216, 832))):
            out = tmp_path / size
            proc = _generate(server, "stability", suite, out, "--size", size, "--images-per-prompt", "1")
            assert proc.returncode == 0 and "1 new image(s)" in proc.stdout, proc.stdout + proc.stderr[-2000:]
            image = _meta(out, "a plain digit")["images"][0]
            assert image["seed"] == str(image["seed_sent"]) and json.loads(
                (out / "generation.json").read_text())["size"] == size
            from PIL import Image

            assert Image.open(out / "images" / image["file"]).size == pixels, ratio
        paid = server.paid_for("stability")
        again = _generate(server, "stability", suite, tmp_path / "1500x1000", "--size", "1500x1000",
                          "--images-per-prompt", "1")
        assert again.returncode == 0 and server.paid_for("stability") == paid  # kept: never asked (paid) again
        bare = _generate(server, "stability", suite, tmp_path / "sd3", "--model", "sd3")
        assert bare.returncode == 2 and "sd3.5-large" in bare.stderr and server.paid_for("stability") == paid


def test_every_billed_image_is_counted_kept_or_not(tmp_path):
    suite = _suite(tmp_path, ["a skewed digit"])
    out = tmp_path / "sd"
    with ProviderServer() as server:
        for _ in range(2):  # the service answers another ratio each time: rejected, paid, asked again
            proc = _generate(server, "stability", suite, out, "--size", "1500x1000", "--images-per-prompt", "1",
                             "--price-per-image", "0.03")
            assert proc.returncode == 1 and "1 failed" in proc.stdout, proc.stdout + proc.stderr[-2000:]
        paid = server.paid_for("stability")
    totals = _totals(out)
    assert paid == 2 and totals["images"] == 0
    assert totals["billed_images"] == 2 and totals["requests"] == 2 and totals["cost"] == pytest.approx(0.06)
    assert "aspect ratio 3:2 but got 1344x768" in _meta(out, "a skewed digit")["failed"][0]["error"]


def test_midjourney_terminal_states_transient_failures_versions_and_reused_ids(tmp_path):
    suite = _suite(tmp_path, ["a modal digit", "a cancel digit", "a failure9 digit", "a plain digit",
                              "a dupid digit", "another dupid digit"])
    out = tmp_path / "mj"
    with ProviderServer() as server:
        first = _generate(server, "midjourney", suite, out, "--concurrency", "1")
        assert first.returncode == 1, first.stdout + first.stderr[-2000:]
        for prompt, state in (("a modal digit", "MODAL"), ("a cancel digit", "CANCEL")):
            meta = _meta(out, prompt)
            assert meta["pending"] == [] and f"ended {state}" in meta["failed"][0]["error"], prompt
        assert "code 9" in _meta(out, "a failure9 digit")["failed"][0]["error"]  # this image, not the run
        images = _meta(out, "a plain digit")["images"]
        assert len(images) == 4 and {i["model_version"] for i in images} == {"v7"}
        # one task id answered to two prompts: the second is failed with both ids, never filed under both
        owner, other = _meta(out, "a dupid digit"), _meta(out, "another dupid digit")
        assert len(owner["images"]) == 4 and other["images"] == []
        error = other["failed"][0]["error"]
        assert "'a-dupid-digit'" in error and "'another-dupid-digit'" in error
        assert owner["images"][0]["task_id"] in error
        again = _generate(server, "midjourney", suite, out)
        assert server.paid[("midjourney", "a modal digit")] == 2  # failed: submitted again, not polled forever
        assert len(_meta(out, "a failure9 digit")["images"]) == 4, again.stderr[-2000:]


def test_bfl_ultra_takes_an_aspect_ratio_png_is_asked_for_and_seeds_are_recorded(tmp_path):
    suite = _suite(tmp_path, ["a plain digit"])
    out = tmp_path / "ultra"
    with ProviderServer() as server:
        proc = _generate(server, "bfl", suite, out, "--model", "flux-pro-1.1-ultra", "--size", "1600x900",
                         "--images-per-prompt", "1")
        assert proc.returncode == 0 and "1 new image(s)" in proc.stdout, proc.stdout + proc.stderr[-2000:]
        image = _meta(out, "a plain digit")["images"][0]
        task = server.tasks[image["task_id"]]
        assert task["size"] == (32, 18) and task["fmt"] == "png"  # aspect_ratio 16:9 sent, PNG asked for
        assert image["format"] == "PNG" and image["seed"] == task["seed"]
        wide = _generate(server, "bfl", suite, tmp_path / "w", "--model", "flux-pro-1.1-ultra", "--size", "2200x900")
        assert wide.returncode == 2 and "21:9 to 9:21" in wide.stderr


def test_a_finished_task_whose_image_url_expired_is_polled_again_not_paid_again(tmp_path):
    suite = _suite(tmp_path, ["an expiring digit"])
    out = tmp_path / "bfl"
    with ProviderServer() as server:
        first = _generate(server, "bfl", suite, out, "--images-per-prompt", "1")
        assert first.returncode == 1 and "pending" in first.stdout, first.stdout + first.stderr[-2000:]
        assert "fresh URL" in first.stderr
        pending = _meta(out, "an expiring digit")["pending"]
        again = _generate(server, "bfl", suite, out, "--images-per-prompt", "1")
        assert again.returncode == 0 and "1 new image(s)" in again.stdout, again.stdout + again.stderr[-2000:]
        image = _meta(out, "an expiring digit")["images"][0]
        assert server.paid[("bfl", "an expiring digit")] == 1 and image["task_id"] == pending[0]["task"]["id"]


def test_openai_chat_counts_only_marked_refusals(tmp_path):
    suite = _suite(tmp_path, ["a refuse digit", "a words digit"])
    out = tmp_path / "chat"
    with ProviderServer() as server:
        proc = _generate(server, "openai-chat", suite, out, "--images-per-prompt", "1")
    assert proc.returncode == 1 and "1 refused" in proc.stdout and "1 failed" in proc.stdout, proc.stdout
    assert _meta(out, "a refuse digit")["refused"][0]["code"] == "content_filter"
    assert "Still drawing" in _meta(out, "a words digit")["failed"][0]["error"]


def _openai(server, suite, out, model, *extra):
    return genbench("generate", "--api-base", server.base, "--model", model, "--prompts", str(suite), "--out",
                    str(out), "--api-key-env", "STANDIN_KEY", "--max-retries", "1", *extra,
                    env={"STANDIN_KEY": OPENAI_KEY}, timeout=120)


def test_openai_response_format_by_model_and_an_empty_quota_stops_the_run(tmp_path):
    suite = _suite(tmp_path, ["a plain digit"])
    with FaultServer() as server:
        gpt = _openai(server, suite, tmp_path / "gpt", "gpt-image-1")
        assert gpt.returncode == 0 and "1 new image(s)" in gpt.stdout, gpt.stdout + gpt.stderr[-2000:]
        dalle = _openai(server, suite, tmp_path / "dalle", "dall-e-3")
        assert dalle.returncode == 0, dalle.stderr[-2000:]
        forced = _openai(server, suite, tmp_path / "forced", "gpt-image-1", "--response-format", "b64_json")
        assert forced.returncode == 2 and "response_format" in forced.stderr
        quota = _openai(server, _suite(tmp_path, [f"a quota digit {i}" for i in range(6)]), tmp_path / "q",
                        "dall-e-3", "--concurrency", "1")
        assert quota.returncode == 2 and "quota" in quota.stderr and "Traceback" not in quota.stderr
        assert sum(n for p, n in server.calls.items() if "quota" in p) <= 2  # the first prompt (and its retry)


def test_a_429_without_retry_after_waits_out_a_documented_lockout():
    from pipeline.services.http import retries_taken, retrying_client

    hits: list[float] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            hits.append(time.monotonic())
            status = 429 if len(hits) == 1 else 200  # Stability's lockout answer: no Retry-After
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with retrying_client(10, 2, backoff=0.01, lockout=1.0) as client:
            response = client.get(f"http://127.0.0.1:{httpd.server_address[1]}/")
        assert response.status_code == 200 and retries_taken(response) == 1
        assert hits[1] - hits[0] >= 0.95  # the lockout, not the 10 ms backoff
    finally:
        httpd.shutdown()
        httpd.server_close()
