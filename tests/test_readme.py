"""README.md promises commands; every script and flag it names must exist (docs that drift from the code are a
classic teaching-repo bug). Flags are checked against each script's own --help output."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands():
    """Every `python SCRIPT.py ...` invocation inside the README's code blocks and inline code."""
    text = open(os.path.join(ROOT, "README.md")).read()
    code = "\n".join(re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]+)`", text))
    return re.findall(r"python (?:-m )?(\w+\.py)([^\n&|;#]*)", code)


def test_readme_has_the_two_newcomer_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    assert "pip install -r requirements.txt && python train.py" in text
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    test_command = [l.strip() for l in ci.splitlines() if "pytest" in l][-1]
    assert test_command in text, f"README must show CI's test command {test_command!r}"


def test_every_script_and_flag_in_the_readme_exists():
    commands = readme_commands()
    assert len(commands) >= 3
    flags_by_script = {}
    for script, args in commands:
        assert os.path.exists(os.path.join(ROOT, script)), f"README names {script}, which does not exist"
        flags_by_script.setdefault(script, set()).update(set(re.findall(r"--(\w+)", args)) - {"help"})
    for script, flags in flags_by_script.items():
        if not flags:
            continue
        help_text = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                                   timeout=120).stdout
        for flag in flags:
            assert re.search(rf"--{flag}\b", help_text), f"README uses {script} --{flag}, not in its --help"
