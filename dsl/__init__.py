"""The plan DSL: grammar, parser, AST, semantic checks and error catalogue."""
