"""API keys: only digests are stored, a password change revokes them, a key can be revoked,
and tokens made before API keys keep working once hashed by the migration."""

import hashlib

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from rest_framework.test import APIClient

from accounts.models import ApiKey
from tests.conftest import PASSWORD
from tests.factories import assert_detail

pytestmark = pytest.mark.django_db


def obtain(username="owner", password=PASSWORD):
    response = APIClient().post("/api/token/", {"username": username, "password": password})
    assert response.status_code == 200, response.content
    return response.json()["token"]


def with_key(key) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return client


def works(key) -> bool:
    return with_key(key).get("/api/conversations/").status_code == 200


def test_only_a_digest_of_each_key_is_stored(owner):
    first, second = obtain(), obtain()
    assert first != second and works(first) and works(second), "each client its own key"
    stored = list(ApiKey.objects.filter(user=owner).values())
    assert {row["digest"] for row in stored} == {
        hashlib.sha256(key.encode()).hexdigest() for key in (first, second)
    }
    assert not any(key in str(stored) for key in (first, second))
    assert {row["prefix"] for row in stored} == {first[:8], second[:8]}


def test_a_password_change_revokes_the_users_keys(owner, other_user):
    key, theirs = obtain(), obtain(other_user.username)
    owner.set_password("a-New-passw0rd-2")
    owner.save()
    assert_detail(with_key(key).get("/api/conversations/"), 401)
    assert works(theirs), "other users' keys stay"
    assert works(obtain(password="a-New-passw0rd-2"))


def test_a_password_changed_in_the_admin_revokes_the_users_keys(admin_client, owner):
    key = obtain()
    new = "a-New-passw0rd-2"
    page = admin_client.post(
        f"/admin/auth/user/{owner.pk}/password/",
        {"password1": new, "password2": new, "usable_password": "true"},
    )
    assert page.status_code == 302
    assert not works(key)


def test_a_password_rehashed_at_sign_in_keeps_the_keys(owner, settings):
    key = obtain()
    # A stronger hasher comes first: signing in rehashes the same password with it.
    settings.PASSWORD_HASHERS = [
        "django.contrib.auth.hashers.PBKDF2PasswordHasher",
        "django.contrib.auth.hashers.MD5PasswordHasher",
    ]
    obtain()
    owner.refresh_from_db()
    assert owner.password.startswith("pbkdf2_sha256$")
    assert works(key)


def test_delete_revokes_the_key_it_is_sent_with_and_no_other(owner):
    key, other = obtain(), obtain()
    response = with_key(key).delete("/api/token/")
    assert response.status_code == 204
    assert_detail(with_key(key).get("/api/conversations/"), 401)
    assert_detail(with_key(key).delete("/api/token/"), 401)
    assert works(other)


def test_delete_needs_a_key(client, owner, anon_api):
    assert_detail(anon_api.delete("/api/token/"), 401)
    session = APIClient()
    session.force_login(owner)
    detail = assert_detail(session.delete("/api/token/"), 400)
    assert "Authorization: Token" in detail


@pytest.mark.django_db(transaction=True)
def test_tokens_from_before_api_keys_keep_working_after_the_migration(owner):
    executor = MigrationExecutor(connection)
    executor.migrate([("accounts", "0001_initial")])
    # DRF's token table, as a database from before API keys has it (its date column of the
    # type Django gives a DateTimeField on this database).
    created_type = connection.data_types["DateTimeField"]
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE TABLE authtoken_token (key varchar(40) PRIMARY KEY,"
            f" created {created_type} NOT NULL, user_id integer NOT NULL UNIQUE)"
        )
        cursor.execute(
            "INSERT INTO authtoken_token VALUES (%s, %s, %s)",
            ["9944b09199c62bcf9418ad846dd0e4bbdfc6ee4b", "2024-05-01 10:00:00", owner.pk],
        )
    try:
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate(executor.loader.graph.leaf_nodes())
        assert works("9944b09199c62bcf9418ad846dd0e4bbdfc6ee4b")
        key = ApiKey.objects.get(user=owner)
        assert (key.prefix, key.created.year) == ("9944b091", 2024)
        with connection.cursor() as cursor:
            cursor.execute("SELECT COUNT(*) FROM authtoken_token")
            assert cursor.fetchone()[0] == 0, "no key left in plain text"
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE authtoken_token")


def test_staff_see_keys_by_name_and_prefix_and_can_revoke_them(admin_client, owner):
    key = obtain()
    api_key = ApiKey.objects.get(user=owner)
    page = admin_client.get("/admin/accounts/apikey/")
    assert page.status_code == 200
    assert key[:8] in page.content.decode() and key not in page.content.decode()
    assert admin_client.get("/admin/accounts/apikey/add/").status_code == 403
    deleted = admin_client.post(f"/admin/accounts/apikey/{api_key.pk}/delete/", {"post": "yes"})
    assert deleted.status_code == 302
    assert not works(key)
