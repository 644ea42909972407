"""The statements every station's steps repeat, with their SQL built once.

A station's migration writes ~10 history rows, ~5 exchange rows and ~10 conditional
updates, and reads a few single values. Through the ORM each one builds its query anew
(the model instance, the compiler, the SQL): 0.3-0.6 ms of worker CPU each, a third of what
a station cost (benchmarks/README.md, issue 9). These build the same statements once per
model and set of fields (with Django's compiler, quoting and field conversions), and then
only convert the values. insert_row, update_where and select_value take plain values; a
statement with expressions (``F``, ``Case``) is compiled once with compiled_update.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

from django.db import connection, models
from django.db.models import QuerySet, sql
from django.db.models.expressions import Col


def insert_row(model: type[models.Model], **values: Any) -> None:
    """INSERT one row of ``model``: the given fields (by attname, e.g. ``migration_id``), and
    the defaults of the others, as ``model.objects.create`` would write them."""
    statement, fields = _insert_statement(connection.alias, model)
    unknown = values.keys() - {field.attname for field in fields}
    if unknown:
        raise TypeError(f"{model.__name__} has no field(s) {sorted(unknown)}")
    params = [
        field.get_db_prep_save(
            values[field.attname] if field.attname in values else field.get_default(),
            connection,
        )
        for field in fields
    ]
    with connection.cursor() as cursor:
        cursor.execute(statement, params)


def update_where(model: type[models.Model], where: dict[str, Any], values: dict[str, Any]) -> int:
    """UPDATE ``model`` SET values WHERE each of ``where`` equals its value; the rows updated.

    Fields by attname, values plain (no expressions).
    """
    statement, set_fields, where_fields = _update_statement(
        connection.alias, model, tuple(values), tuple(where)
    )
    params = [field.get_db_prep_save(values[field.attname], connection) for field in set_fields]
    params += [field.get_db_prep_value(where[field.attname], connection) for field in where_fields]
    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.rowcount


def select_value(model: type[models.Model], attname: str, pk: Any) -> Any:
    """One field of one row, converted as the ORM would (KeyError when there is no row)."""
    statement, column, converters = _select_statement(connection.alias, model, attname)
    with connection.cursor() as cursor:
        cursor.execute(statement, [pk])
        row = cursor.fetchone()
    if row is None:
        raise KeyError(f"no {model.__name__} {pk}")
    value = row[0]
    for convert in converters:
        value = convert(value, column, connection)
    return value


def compiled_update(
    queryset: QuerySet[Any], changes: dict[str, Any]
) -> tuple[str, tuple[Any, ...]]:
    """The SQL and parameters ``queryset.update(**changes)`` would run, for a statement
    with expressions that is worth compiling once."""
    query = queryset.query.chain(sql.UpdateQuery)
    query.add_update_values(changes)
    statement, params = query.get_compiler(queryset.db).as_sql()
    return statement, tuple(params)


def _field(model: type[models.Model], attname: str) -> models.Field:
    for field in model._meta.concrete_fields:
        if field.attname == attname:
            return field
    raise TypeError(f"{model.__name__} has no field {attname!r}")


@cache
def _insert_statement(alias: str, model: type[models.Model]) -> tuple[str, list[models.Field]]:
    # The alias is in the key because the SQL is the connection vendor's.
    fields = [field for field in model._meta.concrete_fields if not field.primary_key]
    query = sql.InsertQuery(model)
    query.insert_values(fields, [model()])
    [(statement, _)] = query.get_compiler(using=alias).as_sql()
    return statement, fields


@cache
def _update_statement(
    alias: str, model: type[models.Model], set_names: tuple[str, ...], where_names: tuple[str, ...]
) -> tuple[str, list[models.Field], list[models.Field]]:
    quote = connection.ops.quote_name
    set_fields = [_field(model, name) for name in set_names]
    where_fields = [_field(model, name) for name in where_names]
    assignments = ", ".join(f"{quote(field.column)} = %s" for field in set_fields)
    conditions = " AND ".join(f"{quote(field.column)} = %s" for field in where_fields)
    statement = f"UPDATE {quote(model._meta.db_table)} SET {assignments} WHERE {conditions}"
    return statement, set_fields, where_fields


@cache
def _select_statement(
    alias: str, model: type[models.Model], attname: str
) -> tuple[str, Col, list[Callable[..., Any]]]:
    quote = connection.ops.quote_name
    field = _field(model, attname)
    column = field.get_col(model._meta.db_table)
    # The backend's and the field's, in the compiler's order (e.g. JSON text to a dict).
    converters = connection.ops.get_db_converters(column) + field.get_db_converters(connection)
    table, pk = quote(model._meta.db_table), quote(model._meta.pk.column)
    statement = f"SELECT {quote(field.column)} FROM {table} WHERE {pk} = %s"
    return statement, column, converters
