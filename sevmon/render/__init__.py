"""Pictures of guest state (SVG), drawn with drawsvg: no hand-written markup."""
