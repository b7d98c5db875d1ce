"""Secrets out of logs, summaries and API replies: a table of real-world signed and credentialed URLs."""

from __future__ import annotations

import logging

import pytest

from blinkflow.redact import MASK, install_log_redaction, redact_text, redact_url, remember_secrets

SIGNED = [
    # (url, the secret values that must not survive)
    ("https://bucket.s3.amazonaws.com/cam/1.mp4?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE%2F20261202"
     "%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20261202T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
     "&X-Amz-Signature=0f1e2d3c4b5a69788796a5b4c3d2e1f0&X-Amz-Security-Token=FQoGZXIvYXdzEXAMPLE",
     ["AKIAEXAMPLE", "0f1e2d3c4b5a69788796a5b4c3d2e1f0", "FQoGZXIvYXdzEXAMPLE"]),
    ("https://storage.googleapis.com/b/o.ts?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=svc%40proj.iam"
     "&X-Goog-Signature=abcdef0123456789", ["svc%40proj.iam", "abcdef0123456789"]),
    ("https://acct.blob.core.windows.net/c/v.mp4?sv=2022-11-02&se=2026-12-03&sp=r&sig=Zm9vYmFyYmF6cXV4", ["Zm9vYmFyYmF6cXV4"]),
    ("http://cam.local/live.ts?token=tok123456&session=s3ss10n&jwt=eyJhbGciOi.eyJzdWIi.c2ln&auth_token=at987",
     ["tok123456", "s3ss10n", "eyJhbGciOi.eyJzdWIi.c2ln", "at987"]),
    ("rtsp://admin:pw@cam-1/stream?apikey=k3y-k3y", [":pw@", "k3y-k3y"]),
]


@pytest.mark.parametrize("url, secrets", SIGNED, ids=[u.split("//")[1][:22] for u, _ in SIGNED])
def test_signed_and_credentialed_urls_lose_their_secrets(url, secrets):
    for redacted in (redact_url(url), redact_text(f"ffmpeg: cannot open {url}: 403 Forbidden")):
        assert not any(secret in redacted for secret in secrets), redacted
        assert MASK in redacted
    assert "X-Amz-Date=20261202T000000Z" in redact_url(SIGNED[0][0])  # not a credential: kept for debugging


def test_a_short_password_is_scrubbed_from_free_text_as_a_word():
    remember_secrets("rtsp://cam:pw1@10.0.0.9/live")
    text = redact_text("login failed for pw1 (pw12 and apw1 are other words)")
    assert text == f"login failed for {MASK} (pw12 and apw1 are other words)"


def test_bearer_tokens_are_scrubbed():
    assert redact_text("Authorization: Bearer abc.def-ghi_jkl") == f"Authorization: Bearer {MASK}"


def test_every_log_record_goes_through_the_redaction(caplog):
    remember_secrets("rtsp://u:Sup3rS3cret@cam/live")
    install_log_redaction()
    root = logging.getLogger()
    handler = logging.StreamHandler()
    records = []
    handler.emit = lambda record: records.append(handler.format(record))  # type: ignore[method-assign]
    root.addHandler(handler)
    try:
        install_log_redaction()
        logging.getLogger("ffmpeg").warning("open %s failed", "rtsp://u:Sup3rS3cret@cam/live?token=t0ken99")
    finally:
        root.removeHandler(handler)
    assert records and "Sup3rS3cret" not in records[0] and "t0ken99" not in records[0]


# --------------------------------------------------------------------------- the audit: every surface of a real run


def test_metric_labels_and_json_values_go_through_the_redaction():
    from prometheus_client import generate_latest

    from blinkflow.metrics import SINK_LEDGER, PrometheusRecorder
    from blinkflow.redact import redact_obj

    remember_secrets("rtsp://cam:Zq9-label-pass@10.0.0.5/live")
    recorder = PrometheusRecorder()
    recorder.on_stream_state("http://10.0.0.5/cam?sig=label-sig-77", up=True)
    recorder.on_reconnect("lobby Zq9-label-pass")
    SINK_LEDGER.count_delivered("webhook http://h/x?access_token=ledger-tok-5")
    text = generate_latest(recorder.registry).decode()
    assert "blinkflow_stream_up" in text and "sig=***" in text and "access_token=***" in text
    for secret in ("label-sig-77", "Zq9-label-pass", "ledger-tok-5"):
        assert secret not in text
    reply = redact_obj({"streams": [{"url": "rtsp://u:p4ss-word@h/x?token=t0k3n", "errors": ("jwt=abc.def",)}],
                        "k?secret=s3cr3t": 1, "count": 3})
    assert reply == {"streams": [{"url": f"rtsp://{MASK}@h/x?token={MASK}", "errors": [f"jwt={MASK}"]}],
                     f"k?secret={MASK}": 1, "count": 3}


SECRETS = ("Sh0rtPw", "tok-SECRET-1", "amzSIG123", "tok-SECRET-2", "bearer-SECRET-3")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_no_secret_of_a_runs_urls_reaches_its_logs_summaries_or_metrics(tmp_path):
    """A run with a credentialed camera URL that fails and a webhook with a token in its URL and a bearer
    token: its stdout, stderr (verbose logs), --summary-json and /metrics scraped while it runs hold none."""
    import json
    import subprocess
    import sys
    import time
    import urllib.request

    from tests.conftest import REPO_ROOT
    from tests.test_metrics import free_port

    dead, metrics_port = free_port(), free_port()
    (tmp_path / "token").write_text("bearer-SECRET-3\n")
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({
        "sources": [
            {"type": "stream", "url": f"rtsp://admin:Sh0rtPw@127.0.0.1:{dead}/live?token=tok-SECRET-1"
                                     "&X-Amz-Signature=amzSIG123", "max_retries": 1, "backoff_initial_s": 0.1,
             "open_timeout_s": 2},
            {"type": "synthetic", "id": "scene", "width": 32, "height": 24, "num_frames": 150}],
        "stages": {"chaos": {"batch": 1, "options": {"sleep_ms": 20}}},
        "sinks": [{"type": "jsonl", "path": str(tmp_path / "out.jsonl")},
                  {"type": "webhook", "url": f"http://127.0.0.1:{dead}/hook?access_token=tok-SECRET-2",
                   "token_file": str(tmp_path / "token"), "close_timeout_s": 0.5}],
        "metrics": {"enabled": True, "port": metrics_port},
    }))
    proc = subprocess.Popen([sys.executable, "-m", "blinkflow.cli", "-v", "run", str(config), "--no-progress",
                             "--summary-json", str(tmp_path / "summary.json")],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    scrapes = []
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as reply:
                    scrapes.append(reply.read().decode())
            except OSError:
                pass
            time.sleep(0.3)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    summary = (tmp_path / "summary.json").read_text()
    surfaces = {"stdout": stdout, "stderr": stderr, "summary.json": summary, "metrics": "\n".join(scrapes)}
    # the run did say where things went wrong, so the URLs were there to leak
    assert any("blinkflow_stream_up" in s for s in scrapes), "no scrape while the run went on"
    assert "127.0.0.1" in json.loads(summary)["source_errors"][0]
    assert MASK in stderr and MASK in summary
    for name, text in surfaces.items():
        for secret in SECRETS:
            assert secret not in text, f"{secret} leaked into {name}"


def test_passwords_in_a_dvrs_path_and_odd_parameter_names_are_masked():
    """GET /streams served them: the path was never looked at, and loginpas has no 'pass' in it."""
    from blinkflow.redact import redact_text, redact_url

    assert redact_url("rtsp://198.18.0.1:554/user=admin_password=hunter22_channel=1") == \
        "rtsp://198.18.0.1:554/user=admin_password=***"
    assert "hunter22" not in redact_url("http://198.18.0.1/videostream.cgi?loginuse=admin&loginpas=hunter22")
    assert "hunter22" not in redact_text("cannot open rtsp://cam/user=admin_pwd=hunter22_stream=0: 404")


def test_learned_secrets_are_bounded_and_the_oldest_go(monkeypatch):
    """Each new password grew the set (and one recompile under the lock every log line takes) without end."""
    from blinkflow import redact

    monkeypatch.setattr(redact, "_known_secrets", {})
    monkeypatch.setattr(redact, "MAX_KNOWN_SECRETS", 3)
    for index in range(5):
        redact.remember_secrets(f"rtsp://u:secret-number-{index}@cam/x")
    redact.remember_secrets("rtsp://u:" + "z" * (redact.MAX_SECRET_CHARS + 1) + "@cam/x")  # too long to learn
    assert list(redact._known_secrets) == [f"secret-number-{index}" for index in (2, 3, 4)]
    assert redact.redact_text("said secret-number-4 and secret-number-0") == "said *** and secret-number-0"
