from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from monk.core import tenant_names
from monk.core.scram import verifier
from monk.errors import InvalidName

# Pinned: changing the hash would orphan every existing tenant database. Computed outside
# monk: printf '%s' 'acme corp' | sha256sum | cut -c1-16
VECTORS = {
    "acme_corp": "tenant_cca8c7942f8c15a2",
    "Acme Corp": "tenant_ea6f9c07a2f95c78",
    "Société Générale": "tenant_d9a4ba63397a5683",
}


@pytest.mark.parametrize(("name", "database"), VECTORS.items())
def test_hash_vectors(name: str, database: str) -> None:
    assert tenant_names.normalize(name).database == database


def test_identity_is_case_insensitive_nfc_and_trimmed() -> None:
    a = tenant_names.normalize("  Acme Corp ")
    b = tenant_names.normalize("acme corp")
    assert a.key == b.key == "acme corp"
    assert a.database == b.database
    assert a.display == "Acme Corp"
    decomposed = "Socie\u0301te\u0301 Ge\u0301ne\u0301rale"
    assert tenant_names.normalize(decomposed).database == VECTORS["Société Générale"]


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("a\x00b", "control"),
        ("a\nb", "control"),
        ("x" * 129, "at most 128"),
    ],
)
def test_bad_names_are_refused(raw: str, needle: str) -> None:
    with pytest.raises(InvalidName, match=needle):
        tenant_names.normalize(raw)


@given(st.text(max_size=200))
def test_any_string_gives_a_valid_name_or_invalid_name(raw: str) -> None:
    try:
        name = tenant_names.normalize(raw)
    except InvalidName:
        return
    assert tenant_names.is_tenant_database(name.database)
    assert len(name.database.encode()) <= 63


def test_scram_verifier_matches_rfc7677_vector() -> None:
    # RFC 7677's example: password "pencil", salt W22ZaJ0SNY7soEsUEjb6gQ==, 4096 iterations.
    import base64

    out = verifier("pencil", salt=base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ=="))
    assert out == (
        "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$"
        "WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
    )
