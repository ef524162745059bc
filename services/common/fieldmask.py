"""AIP-134 update masks."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf import field_mask_pb2
from google.protobuf.message import Message

from services.common.errors import InvalidArgument


def update_paths(
    mask: field_mask_pb2.FieldMask,
    resource: Message,
    updatable: Iterable[str],
    *,
    field: str = "update_mask",
) -> set[str]:
    """The fields to update.

    An explicit mask must name only updatable fields ("*" means all of them). An
    empty mask means every updatable field that is set to a non-default value
    in `resource` (AIP-134's implied mask). Nothing to update is INVALID_ARGUMENT.
    """
    allowed = set(updatable)
    paths = set(mask.paths)
    if "*" in paths:
        return allowed
    if paths:
        unknown = sorted(paths - allowed)
        if unknown:
            raise InvalidArgument.field(
                field,
                f"cannot update {', '.join(unknown)}; updatable: {', '.join(sorted(allowed))}",
            )
        return paths
    implied = {fd.name for fd, _ in resource.ListFields() if fd.name in allowed}
    if not implied:
        raise InvalidArgument.field(field, "names no field to update")
    return implied
