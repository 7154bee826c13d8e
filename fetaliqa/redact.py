"""What a run may write about a URL: never its credentials nor its signature.

A presigned URL carries its authority in its query string (S3 `X-Amz-Signature`/`X-Amz-Credential` or the
older `AWSAccessKeyId`/`Signature`, GCS `X-Goog-Signature`, an Azure SAS `sig`), and a URL may carry a
user name and password before its host. Reading uses the URL as given; every URL written to an output
(`run.json`, the `source`, `message` and `note` columns), a message or a log line goes through `public_url`
(one URL) or `redact_text` (free text holding URLs) first. The rule is whole, not a list of parameters:
a URL (anything with a scheme) loses its user info, query string and fragment. A query string in text
without a scheme (a bare file name cut from a presigned URL) is dropped when it holds a signing parameter.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

# A URL in free text: a scheme, then anything up to white space, a quote or an angle bracket; punctuation
# that ends it in prose ("<url>: no such file", "(... <url>).") stays outside. A query string likewise.
_END = r"""(?=[)\]},;:.]*(?:[\s'"<>]|$))"""
_URL = re.compile(r"""[A-Za-z][A-Za-z0-9+.-]*://[^\s'"<>]*?""" + _END)
_QUERY = re.compile(r"""\?[^\s'"<>]*?""" + _END)
_SIGNING_PARAMETER = re.compile(
    r"(?:^|[?&])(?:x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential|"
    r"awsaccesskeyid|signature|sig)=", re.IGNORECASE)


def public_url(url: str) -> str:
    """`url` without user info, query string or fragment (`https://u:p@h/b/x.mha?X-Amz-Signature=..` ->
    `https://h/b/x.mha`); a local path loses only a query string holding a signing parameter."""
    if "://" not in url:
        return _without_signed_queries(url)
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket: keep nothing that could be a secret
        return url.split("://", 1)[0] + "://(unparsable URL)"
    if "@" not in parts.netloc and not parts.query and not parts.fragment:
        return url  # nothing to drop: kept as written (urlunsplit would turn a bare "s3://" into "s3:")
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def redact_text(text: str) -> str:
    """`text` with every URL in it made `public_url`, and signed query strings without a scheme dropped."""
    return _without_signed_queries(_URL.sub(lambda match: public_url(match.group(0)), text))


def _without_signed_queries(text: str) -> str:
    return _QUERY.sub(lambda match: "" if _SIGNING_PARAMETER.search(match.group(0)) else match.group(0), text)
