from setuptools import find_packages, setup

setup(
    name="devpi-twisted",
    version="0.1.0",
    description="A reliable private and caching Python package index on Twisted, devpi-compatible",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(include=["devpi_twisted", "devpi_twisted.*"]) + ["twisted.plugins"],
    include_package_data=True,
    package_data={"devpi_twisted.web.ui": ["static/*.css", "static/*.js"]},
    install_requires=[
        "twisted[tls]>=26.4",
        "klein>=24.8",
        "werkzeug>=2.3",
        "treq>=24.9",
        "automat>=24.8.1",
        "service-identity>=24.1",
        "pyopenssl>=25.0",
        "zope.interface>=6.0",
        "packaging>=24.0",
        "argon2-cffi>=23.1",
        "prometheus-client>=0.20",
        "multipart>=2.0",
        # API tokens are macaroons, byte-compatible with devpi-tokens' (and PyPI's)
        "pymacaroons>=0.13",
        # the web interface renders descriptions as PyPI does (rst, Markdown via
        # comrak, plain), sanitised with nh3: the [md] extra is the Markdown part
        "readme_renderer[md]>=44",
    ],
    extras_require={
        # --storage postgresql: psycopg 3 and its connection pool
        "postgresql": ["psycopg[binary]>=3.2", "psycopg-pool>=3.2"],
        # --blobs s3: boto3, the AWS SDK (credentials the standard AWS way)
        "s3": ["boto3>=1.34"],
    },
    entry_points={"console_scripts": ["devpi-twisted = devpi_twisted.admin.cli:main"]},
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Software Distribution",
    ],
)
