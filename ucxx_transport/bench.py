"""`ucxx-transport bench` (placeholder until the benchmark lands)."""


def add_parser(sub):
    b = sub.add_parser("bench", help="throughput benchmark vs raw ucxx, pyzmq and memcpy")
    b.set_defaults(func=lambda a: 0)
