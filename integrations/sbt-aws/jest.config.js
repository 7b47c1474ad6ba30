// sbt-aws 0.5.25 itself uses deprecated aws-cdk-lib APIs; silence jsii's console.warn noise.
process.env.JSII_DEPRECATED = process.env.JSII_DEPRECATED ?? 'quiet';

/** @type {import('jest').Config} */
module.exports = {
  testEnvironment: 'node',
  roots: ['<rootDir>/test'],
  testMatch: ['**/*.test.ts'],
  // ts-jest type-checks against tsconfig.json (so a wrong IMetering member fails the test run).
  transform: { '^.+\\.tsx?$': 'ts-jest' },
  testTimeout: 120000,
};
