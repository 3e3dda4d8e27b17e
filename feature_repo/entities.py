"""Entities: the join keys every feature view is looked up by (ids are strings in every Delta table)."""

from feast import Entity, ValueType

user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.STRING,
    description="A user of the ranking service (interactions.user_id).",
)

item = Entity(
    name="item",
    join_keys=["item_id"],
    value_type=ValueType.STRING,
    description="A rankable item (items.item_id).",
)

behavior = Entity(
    name="behavior",
    join_keys=["behavior_id"],
    value_type=ValueType.STRING,
    description="One atomic behaviour text, shared by all users who did it (behaviors.behavior_id).",
)
