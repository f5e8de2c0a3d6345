"""One module per stage, each with `main(recipe) -> Path` returning its output folder."""
