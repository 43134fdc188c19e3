"""Views of a plan: text summary, self-contained HTML, Graphviz DOT, and the semantic diff."""
