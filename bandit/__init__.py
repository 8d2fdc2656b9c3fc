"""nextbest's decision and learning core.

Pure domain code: policies, exploration, featurization and estimators. It imports neither
grpc nor sqlalchemy, so a notebook or a replay job can use it without a server.
"""
