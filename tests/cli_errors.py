"""The one check every CLI error test makes: exit status 2 and one line on stderr naming the problem."""


def assert_one_line_error(capsys, rc, *words):
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
