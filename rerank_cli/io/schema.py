"""The one schema-merging rule: a column's type, fixed by the first rows, may only widen.

Row-wise inputs (JSONL, CSV) are typed chunk by chunk, and the columns a later chunk brings must
agree with those of the earlier ones. `widen` says what the types of both together are: a null column
takes any type, integers and floats meet as float64, narrow integers meet as int64, JSON objects and
arrays meet field by field (a key that appears later is added, null where absent); anything else
(a number that turns into a string, ...) is a `TypeChange`. `conform` casts a batch to a (wider) schema,
and only losslessly (Arrow's safe cast: 2**53 + 1 does not become a float). Every reader, writer and
merge that puts batches together uses these two, so no value is ever cast lossily.
"""

from __future__ import annotations

import pyarrow as pa


class TypeChange(Exception):
    """Column `name` cannot hold both `old` and `new` values."""

    def __init__(self, name: str, old: pa.DataType, new: pa.DataType):
        super().__init__(f"column {name!r} changes type here ({old} -> {new})")
        self.name, self.old, self.new = name, old, new


def widen_type(name: str, old: pa.DataType, new: pa.DataType) -> pa.DataType:
    if old.equals(new) or pa.types.is_null(new):
        return old
    if pa.types.is_null(old):
        return new
    numeric = (pa.types.is_integer, pa.types.is_floating)
    if any(f(old) for f in numeric) and any(f(new) for f in numeric):
        if pa.types.is_integer(old) and pa.types.is_integer(new):
            return pa.int64()
        return pa.float64()
    if _is_text(old) and _is_text(new):
        return pa.large_string() if pa.types.is_large_string(old) or pa.types.is_large_string(new) else old
    if _is_nested(old) and _is_nested(new):  # JSON objects and arrays: the same rule, field by field
        try:
            merged = pa.unify_schemas([pa.schema([("v", old)]), pa.schema([("v", new)])], promote_options="permissive")
            return merged.field(0).type
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            pass
    raise TypeChange(name, old, new)


def _is_nested(t: pa.DataType) -> bool:
    return pa.types.is_struct(t) or pa.types.is_list(t) or pa.types.is_large_list(t)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def widen(old: pa.Schema | None, new: pa.Schema) -> pa.Schema:
    """The schema that holds rows of both (same column names, in the same order)."""
    if old is None or old.equals(new):
        return new
    if old.names != new.names:
        raise TypeChange(next((a for a, b in zip(old.names, new.names) if a != b), "?"), pa.null(), pa.null())
    return pa.schema([pa.field(o.name, widen_type(o.name, o.type, n.type)) for o, n in zip(old, new)])


def conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """`batch` as `schema` (a widening of its own); raises pa.ArrowInvalid rather than lose a value."""
    if batch.schema.equals(schema):
        return batch
    return pa.RecordBatch.from_arrays(
        [col.cast(f.type, safe=True) for col, f in zip(batch.columns, schema)], schema=schema)
