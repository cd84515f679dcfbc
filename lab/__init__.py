"""Lab code: the paper protocol, the benchmark, synthetic weight families. Never imported by the product."""
