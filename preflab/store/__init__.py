"""The preference store: schema (SQLAlchemy 2), engines and migrations (db), typed ops, import/export (io).

    from preflab.store import db, ops
    db.upgrade(url)
    engine = db.make_engine(url)
    with db.session_scope(engine) as s:
        task = ops.next_task(s, round_id=1, rater_id=3)
"""
