"""Database URLs with libpq's parameters (as psql and pg_dump read them): each is honoured by both
drivers (SQLAlchemy's asyncpg dialect for the engine, asyncpg for the fast path and the watch
listener) or refused up front naming the parameter, never a driver's TypeError at connect time."""

from urllib.parse import parse_qsl, quote, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsipam.server.store.db import DSN_PARAMETERS, SESSION_PARAMETERS, parse_database_url, to_sqlalchemy_url

BASE = "postgresql://u:p@db1:5432,db2:5433/ipam"


def test_parameters_go_where_each_driver_reads_them() -> None:
    url = parse_database_url(BASE + "?sslmode=verify-full&sslrootcert=/ca.pem&connect_timeout=2.5"
                                    "&application_name=ipam-a&options=-c%20statement_timeout%3D5s%20--work_mem%3D4MB"
                                    "&target_session_attrs=read-write")
    assert url.timeout == 2.5
    assert url.server_settings == {"application_name": "ipam-a", "statement_timeout": "5s", "work_mem": "4MB"}
    assert dict(url.dsn_query) == {"sslmode": "verify-full", "sslrootcert": "/ca.pem",
                                   "target_session_attrs": "read-write"}
    dsn = urlsplit(url.asyncpg_dsn())
    assert dict(parse_qsl(dsn.query)) == {"host": "db1,db2", "port": "5432,5433", **dict(url.dsn_query)}
    engine_url = urlsplit(to_sqlalchemy_url(BASE + "?sslmode=require&connect_timeout=3"))
    assert engine_url.scheme == "postgresql+asyncpg"
    assert dict(parse_qsl(engine_url.query)) == {"host": "db1,db2", "port": "5432,5433"}  # the rest: connect args


@pytest.mark.parametrize(("query", "message"), [
    ("bogus=1", "parameter 'bogus' is not supported"),
    ("connect_timeout=soon", "connect_timeout='soon' is not a number of seconds"),
    ("connect_timeout=0", "must be above 0"),
    ("connect_timeout=nan", "must be above 0"),
    ("options=-x", "only '-c name=value' settings"),
    ("options=-c%20novalue", "'novalue' is not name=value"),
])
def test_what_cannot_be_honoured_is_refused_by_name(query: str, message: str) -> None:
    with pytest.raises(ValueError, match="DSIPAM_DATABASE_URL: .*" + message.replace("(", r"\(")):
        parse_database_url(BASE + "?" + query, field="DSIPAM_DATABASE_URL")


_KEYS = st.one_of(st.sampled_from((*DSN_PARAMETERS, *SESSION_PARAMETERS)), st.text(min_size=1, max_size=12))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_KEYS, st.text(max_size=30)), max_size=6))
def test_any_query_is_parsed_or_refused_naming_a_parameter(pairs: list[tuple[str, str]]) -> None:
    query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs)
    try:
        url = parse_database_url(BASE + "?" + query, field="DSIPAM_DATABASE_URL")
    except ValueError as exc:
        assert str(exc).startswith("DSIPAM_DATABASE_URL: ")
        assert any(repr(k) in str(exc) or k in str(exc) for k, _ in parse_qsl(query, keep_blank_values=True))
        return
    read = parse_qsl(query, keep_blank_values=True)
    assert {k for k, _ in read} <= {*DSN_PARAMETERS, *SESSION_PARAMETERS}
    assert {k for k, _ in url.dsn_query} == {k for k, _ in read if k in DSN_PARAMETERS}
    assert url.timeout is None or 0 < url.timeout <= 3600
    assert "connect_timeout" not in url.asyncpg_dsn() and "options" not in url.asyncpg_dsn()


@pytest.mark.parametrize(("query", "message"), [
    ("sslmode=requir", "sslmode='requir' is not one of disable, allow, prefer, require"),
    ("sslmode=", "sslmode='' is not one of"),  # asyncpg drops an empty value: prefer, not what was written
    ("target_session_attrs=primari", "target_session_attrs='primari' is not one of any, read-write"),
    ("ssl_min_protocol_version=TLSv9", "ssl_min_protocol_version='TLSv9' is not one of TLSv1"),
    ("gsslib=krb", "gsslib='krb' is not one of gssapi, sspi"),
    ("sslnegotiation=fast", "sslnegotiation='fast' is not one of postgres, direct"),
    ("sslnegotiation=direct&sslmode=prefer", "sslnegotiation=direct needs sslmode=require"),
])
def test_a_value_asyncpg_would_refuse_at_connect_is_refused_up_front(query: str, message: str) -> None:
    """Found by review: these passed `dsipam serve`'s URL check and failed at the first connection
    (asyncpg's ClientConfigurationError), or, for sslmode=, connected with sslmode=prefer."""
    from dsipam.server.cli import CommandError, check_database_url

    with pytest.raises(ValueError, match="DSIPAM_DATABASE_URL: " + message):
        parse_database_url(BASE + "?" + query, field="DSIPAM_DATABASE_URL")
    with pytest.raises(CommandError, match=message):
        check_database_url(BASE + "?" + query)


@pytest.mark.parametrize("query", ["sslmode=verify-ca&sslrootcert=/ca.pem", "sslmode=disable", "sslmode=allow",
                                   "target_session_attrs=prefer-standby", "ssl_max_protocol_version=TLSv1.3",
                                   "sslnegotiation=direct&sslmode=require", "gsslib=gssapi"])
def test_every_accepted_value_is_one_asyncpg_reads(query: str) -> None:
    import asyncpg.connect_utils as cu

    url = parse_database_url(BASE + "?" + query)
    for key, value in url.dsn_query:
        if key == "sslmode":
            assert cu.SSLMode.parse(value) is not None
        elif key == "target_session_attrs":
            cu.SessionAttribute(value)
        elif key.endswith("_protocol_version"):
            cu._parse_tls_version(value)
        elif key == "sslnegotiation":
            cu.SSLNegotiation(value)


@pytest.mark.parametrize("url", ["postgresql:///dsipam?host=/var/run/postgresql&sslmode=disable",
                                 "postgresql:///dsipam", "postgresql://h1:5432,h2:5433/dsipam"])
def test_a_url_without_user_or_host_in_its_authority_reaches_both_drivers(url: str) -> None:
    """libpq's Unix-socket form (postgresql:///db?host=/dir) passed the URL check, and the engine
    could not be created: SQLAlchemy refused 'postgresql+asyncpg:/dsipam' (urlunsplit drops '//')."""
    from sqlalchemy.engine import make_url

    from dsipam.server.cli import check_database_url
    from dsipam.server.store.db import create_engine

    check_database_url(url)
    engine_url = make_url(to_sqlalchemy_url(url))
    assert engine_url.database == "dsipam"
    create_engine(url).sync_engine.dispose()  # no connection is made
    assert parse_database_url(url).asyncpg_dsn().startswith("postgresql:///dsipam")


def test_libpq_user_password_and_dbname_parameters_are_honoured() -> None:
    """libpq reads user, password and dbname from the query too; they worked before the
    parameters were checked (SQLAlchemy and asyncpg read them) and were then refused."""
    url = parse_database_url("postgresql://db1:5432/?user=ipam&password=s3cret&dbname=ipam")
    assert dict(url.dsn_query) == {"user": "ipam", "password": "s3cret", "dbname": "ipam"}
    assert dict(parse_qsl(urlsplit(url.asyncpg_dsn()).query))["user"] == "ipam"


@pytest.mark.parametrize("query", ["password=s3cret&bogus=1", "sslpassword=s3cret&sslmode=requir",
                                   "sslpassword=s3cret&connect_timeout=soon"])
def test_no_secret_of_the_url_is_shown_in_a_message(query: str) -> None:
    """Found by review: sslpassword (and password) values were printed in the URL check's message
    and in the serve/migrate messages that show the URL (cli._shown masked the authority's only)."""
    from dsipam.server.cli import CommandError, _shown, check_database_url

    with pytest.raises(CommandError) as caught:
        check_database_url("postgresql://u:hunter2@db1/ipam?" + query)
    assert "s3cret" not in str(caught.value) and "hunter2" not in str(caught.value)
    assert "s3cret" not in _shown("postgresql://db1/ipam?" + query)
