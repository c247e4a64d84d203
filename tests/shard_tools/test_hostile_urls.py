"""s3:// URLs parsed once, strictly: bucket name rules, no credentials (refused, never echoed), no
empty or `..` segments; text that looks like a URL but is not one is refused, never packed into a
local folder; an endpoint that is not a URL is named as such."""

from __future__ import annotations

from pathlib import Path

import pytest

from shard_tools import s3
from shard_tools.format import ShardFormatError

FORM = "write it as s3://bucket/prefix"


@pytest.mark.parametrize(("argv", "message"), [
    (["info", "s3://"], f"s3://: names no bucket; {FORM}"),
    (["verify", "s3://bucket/../x"], f"s3://bucket/../x: has an empty, '.' or '..' path segment; {FORM}"),
    (["push", "set", "s3://bucket//x"], f"s3://bucket//x: has an empty, '.' or '..' path segment; {FORM}"),
    (["info", "s3://My_Bucket/x"], "s3://My_Bucket/x: 'My_Bucket' is not a valid bucket name"),
    (["pack", "digits", "s3:/bucket/x"], "s3:/bucket/x: looks like a URL but is not one (an s3:// URL has two "
                                         "slashes: s3://bucket/prefix); for a local folder of that name, write "
                                         "./s3:/bucket/x"),
    (["pack", "digits", "gs://bucket/x"], "gs://bucket/x: storage scheme gs:// is not supported"),
])
def test_urls_that_are_not_s3_urls_are_refused(tmp_path: Path, monkeypatch, cli_error, argv, message) -> None:
    monkeypatch.chdir(tmp_path)
    line = cli_error([*argv, "--quiet"] if argv[0] in ("pack", "push") else argv)
    assert line.split(": error: ", 1)[1].startswith(message)
    assert list(tmp_path.iterdir()) == []  # no local folder named s3: or gs:


@pytest.mark.parametrize("argv", [["info", "s3://user:hunter2@bucket/set"],
                                  ["pack", "digits", "s3://AKIA:hunter2@bucket/set", "--quiet"],
                                  ["push", "set", "s3://u:hunter2@bucket/x", "--quiet"],
                                  ["verify", "https://u:hunter2@host/set"]])
def test_credentials_in_a_url_are_refused_and_never_shown(cli_error, argv) -> None:
    line = cli_error(argv)
    assert "hunter2" not in line and "user:password@" in line and "is refused and not shown" in line


def test_parse_url_accepts_what_s3_accepts() -> None:
    assert s3.parse_url("s3://my.bucket-1/sets/digits/") == ("my.bucket-1", "sets/digits/")
    assert s3.parse_url("s3://abc") == ("abc", "")
    for bad in ("s3://ab/x", "s3://-abc/x", "s3://a..b/x", "s3://10.0.0.1/x", "s3://abc/a\nb", "s3://abc/./x"):
        with pytest.raises(ShardFormatError):
            s3.parse_url(bad)


def test_an_endpoint_that_is_not_a_url_is_named(monkeypatch, cli_error) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "notaurl")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    s3.reset_client()
    try:
        line = cli_error(["info", "s3://bucket/set"])
    finally:
        s3.reset_client()
    assert line == ("mt-shard info: error: the S3 endpoint is not a URL; set AWS_ENDPOINT_URL (or "
                    "AWS_ENDPOINT_URL_S3, the profile's endpoint_url) like http://host:9000, or unset it for AWS itself")
