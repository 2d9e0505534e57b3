"""API keys: only digests are stored, a password change revokes them, a key can be revoked,
and tokens made before API keys keep working once hashed by the migration."""

import hashlib
import html
import re

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from rest_framework.test import APIClient

from accounts.keys import issue_key
from accounts.models import ApiKey
from accounts.views import TOKEN_KEY_NAME
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


# The keys page.


def made_on_page(client, name: str) -> str:
    """Make a key on the keys page; the key shown."""
    page = client.post("/keys/", {"name": name})
    assert page.status_code == 200, page.content
    (key,) = re.findall(r'<code id="new-key">([^<]+)</code>', page.content.decode())
    return html.unescape(key)


def test_a_key_made_on_the_page_is_shown_once_and_works_as_bearer_and_token(owner_client, owner):
    page = owner_client.post("/keys/", {"name": "Open WebUI"})
    assert "no-store" in page["Cache-Control"], "a cache may not keep the key"
    key = made_on_page(owner_client, "laptop")

    stored = ApiKey.objects.get(user=owner, name="laptop")
    assert stored.digest == hashlib.sha256(key.encode()).hexdigest() and stored.prefix == key[:8]
    for scheme in ("Bearer", "Token"):
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"{scheme} {key}")
        assert client.get("/api/conversations/").status_code == 200, scheme

    listed = owner_client.get("/keys/").content.decode()
    assert "laptop" in listed and "Open WebUI" in listed and f"{key[:8]}…" in listed
    assert key not in listed, "shown once only"


def test_the_page_lists_the_users_keys_only_with_their_last_use(owner_client, owner, other_user):
    token = obtain()  # the token endpoint's keys are keys like the others
    with_key(token).get("/api/conversations/")
    issue_key(user=other_user, name="theirs")

    listed = owner_client.get("/keys/").content.decode()
    assert TOKEN_KEY_NAME in listed and token[:8] in listed
    assert "theirs" not in listed
    assert "never" not in listed, "its last use is shown"


@pytest.mark.parametrize(
    ("name", "error"),
    [("", "This field is required."), ("x" * 101, "at most 100 characters")],
)
def test_a_key_needs_a_name(owner_client, owner, name, error):
    page = owner_client.post("/keys/", {"name": name})
    assert page.status_code == 400
    assert error in html.unescape(page.content.decode())
    assert not ApiKey.objects.filter(user=owner).exists()


def test_a_key_revoked_on_the_page_is_refused(owner_client, owner):
    key = made_on_page(owner_client, "script")
    (stored,) = ApiKey.objects.filter(user=owner)

    assert owner_client.get(f"/keys/{stored.pk}/revoke/").status_code == 405
    done = owner_client.post(f"/keys/{stored.pk}/revoke/", follow=True)

    assert done.redirect_chain == [("/keys/", 302)]
    assert "Revoked" in done.content.decode()
    assert_detail(with_key(key).get("/api/conversations/"), 401)
    assert_detail(APIClient(HTTP_AUTHORIZATION=f"Bearer {key}").get("/api/conversations/"), 401)


def test_another_users_key_cannot_be_revoked(owner_client, other_user):
    theirs, key = issue_key(user=other_user, name="theirs")
    assert owner_client.post(f"/keys/{theirs.pk}/revoke/").status_code == 404
    assert works(key)


def test_the_keys_page_needs_a_signed_in_user(client, owner):
    for response in (client.get("/keys/"), client.post("/keys/", {"name": "x"})):
        assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")
    assert not ApiKey.objects.exists()
