"""A director that rewrites every experiment's archive before handing it to the envoys, as a compromised director
would: `alter` adds code to the medfl package, `strip` removes the signature.

usage: python tests/compromised_director.py {alter,strip} director start ...   (the arguments of fx)
"""
import runpy
import sys
import zipfile
from pathlib import Path

from openfl.component.director.director import Director

PAYLOAD = "\nopen('COMPROMISED', 'w').write('the director ran its own code here')\n"


def rewritten(get_experiment_data, mode: str):
    def wrapper(self, experiment_name):
        path = Path(get_experiment_data(self, experiment_name))
        out = path.with_name(path.name + ".rewritten")
        with zipfile.ZipFile(path) as original, zipfile.ZipFile(out, "w") as copy:
            for info in original.infolist():
                if mode == "strip" and info.filename.startswith(".signature/"):
                    continue
                data = original.read(info)
                if mode == "alter" and info.filename.endswith("medfl/tasks.py"):
                    data += PAYLOAD.encode()
                copy.writestr(info, data)
        return out

    return wrapper


if __name__ == "__main__":
    mode = sys.argv.pop(1)
    Director.get_experiment_data = rewritten(Director.get_experiment_data, mode)
    sys.argv[0] = "node"
    runpy.run_module("node", run_name="__main__", alter_sys=True)
