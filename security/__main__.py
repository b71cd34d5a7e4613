"""python -m security check-plaintext {director CONFIG | envoy HOST}: the start scripts' plaintext check."""
import sys

from . import plaintext

if __name__ == "__main__":
    if sys.argv[1:2] != ["check-plaintext"]:
        sys.exit(__doc__)
    plaintext.main(sys.argv[2:])
