"""One module per user job (train, evaluate, predict, ...): each reads top to bottom, resolve ->
build -> loop -> typed result. Recipes never import each other: what two share lives below."""
