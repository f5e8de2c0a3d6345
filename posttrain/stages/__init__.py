"""One module per stage (`posttrain.registry` lists them), each with `parents(recipe)` (the stages whose outputs
it reads), `stage_config(recipe)` (what its output depends on) and `main(recipe, parents) -> Path`, which writes
the stage's folder and returns it. A stage gets its parents' folders and hashes from its caller
(`posttrain.outputs.Parents`); it never imports the runner, the CLI or another stage."""
