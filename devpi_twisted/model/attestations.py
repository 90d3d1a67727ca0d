"""
PEP 740 attestations uploaded with a file.

Signatures are not verified here (that needs Sigstore's trust roots); what is
checked is that each attestation is well formed and names exactly the
uploaded file and its sha256, so a provenance object served for a file is
never about some other file.
"""

import base64
import binascii
import json
from typing import Any

from devpi_twisted.errors import BadRequest

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"


def _invalid(reason: str) -> BadRequest:
    return BadRequest(f"Invalid attestations supplied during upload: {reason}")


def checkAttestations(attestations: list[Any], filename: str, sha256: str) -> None:
    """Refuse attestations that are malformed or about another file."""
    if not attestations:
        raise _invalid("the list is empty")
    for attestation in attestations:
        if not isinstance(attestation, dict) or attestation.get("version") != 1:
            raise _invalid("each attestation must be an object with version 1")
        envelope = attestation.get("envelope")
        if not isinstance(envelope, dict) or not isinstance(envelope.get("statement"), str):
            raise _invalid("an attestation has no envelope statement")
        try:
            statement = json.loads(base64.b64decode(envelope["statement"], validate=True))
        except (binascii.Error, ValueError):
            raise _invalid("an envelope statement is not base64-encoded JSON")
        if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE:
            raise _invalid(f"the statement type must be {STATEMENT_TYPE}")
        subjects = statement.get("subject")
        if not isinstance(subjects, list) or len(subjects) != 1 or not isinstance(subjects[0], dict):
            raise _invalid("a statement must have exactly one subject")
        subject = subjects[0]
        digest = subject.get("digest") if isinstance(subject.get("digest"), dict) else {}
        if subject.get("name") != filename or str(digest.get("sha256", "")).lower() != sha256:
            raise _invalid(f"the subject is not {filename} with sha256 {sha256}")


def provenanceObject(attestations: list[Any], uploader: str | None) -> dict[str, Any]:
    """The PEP 740 provenance object served for a file."""
    return {
        "version": 1,
        "attestation_bundles": [{
            "publisher": {"kind": "devpi-twisted-upload", "claims": {"uploader": uploader}},
            "attestations": attestations,
        }],
    }
