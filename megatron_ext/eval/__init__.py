"""Long-context evaluation: passkey, RULER-style needle / tracking / word tasks, perplexity.

Task generators and scorers are pure and CPU-fast (`passkey`, `needle`, `tracking`,
`frequency`, `scoring`); `model` is the one module that touches a model; `runner` and `cli`
put them together (`python -m megatron_ext.eval`); `scorecard` reproduces docs/scorecard.md.
Protocols and deviations from the papers: docs/eval.md.
"""
