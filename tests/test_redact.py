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
