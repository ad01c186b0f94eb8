"""Training configs that ship with diffaug (``diffaug train --config NAME``): ``tiny`` (CI smoke test) and
``builtin`` (the small default checkpoint)."""
