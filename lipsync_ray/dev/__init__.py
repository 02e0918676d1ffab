"""Developer tooling: stand-in models, synthetic footage and speech, benchmarks, the reference
script, pool sweeps and the demo. The runtime never imports this package
(``tests/test_layout.py`` checks it); the CLI reaches it only inside its tooling commands.
"""
