from monk.core import scram


def test_client_keys_match_the_verifier_they_come_from() -> None:
    stored = scram.verifier("s3cret-token", salt=b"0123456789abcdef", iterations=4096)
    keys = scram.client_keys("s3cret-token", stored)
    assert keys is not None
    client_key, server_key = keys
    assert stored.endswith(":" + server_key)
    assert len(client_key) == 44  # base64 of 32 bytes


def test_client_keys_refuse_a_wrong_password_or_another_verifier() -> None:
    stored = scram.verifier("s3cret-token")
    assert scram.client_keys("other", stored) is None
    assert scram.client_keys("s3cret-token", "md5abcdef") is None
    assert scram.client_keys("s3cret-token", "SCRAM-SHA-256$x:y$z") is None
