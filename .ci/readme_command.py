"""Print the README's set-up command number N, so that CI runs it exactly as the README writes it.

    python3 .ci/readme_command.py 2    # -> pip install -e ".[test,examples]" && python -m pytest tests bench ...

The commands are the first ```bash block of the README's "## Set-up" section: a comment `# N. ...` names the
command on the next non-comment line. Standard library only: it runs before anything is installed.
"""

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def setup_commands(readme: str) -> dict[int, str]:
    """{N: command} from the README text."""
    section = re.search(r"^## Set-up.*?$(.*?)(?=^## )", readme, re.M | re.S)
    if section is None:
        raise ValueError("README.md has no '## Set-up' section")
    block = re.search(r"^```bash\n(.*?)^```", section.group(1), re.M | re.S)
    if block is None:
        raise ValueError("the README's Set-up section has no ```bash block")
    commands, number = {}, None
    for line in block.group(1).splitlines():
        label = re.match(r"#\s*(\d+)\.", line.strip())
        if label:
            number = int(label.group(1))
        elif line.strip() and not line.lstrip().startswith("#") and number is not None:
            commands[number], number = line.strip(), None
    return commands


if __name__ == "__main__":
    print(setup_commands(README.read_text(encoding="utf-8"))[int(sys.argv[1])])
