"""Print the shell command README.md marks with `<!-- ci: NAME -->`, so CI runs it as written."""

import pathlib
import re
import sys

name = sys.argv[1]
readme = pathlib.Path(__file__).resolve().parent.parent.joinpath("README.md").read_text()
marked = rf"<!-- ci: {re.escape(name)} -->\s*```(?:bash|sh|console)?\n(.*?)```"
found = re.search(marked, readme, re.S)
if found is None:
    sys.exit(f"README.md has no block marked <!-- ci: {name} -->")
print(found.group(1).strip())
