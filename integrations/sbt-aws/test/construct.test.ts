import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { ControlPlane } from '@cdklabs/sbt-aws';
import * as cdk from 'aws-cdk-lib';
import { Match, Template } from 'aws-cdk-lib/assertions';
import * as secretsmanager from 'aws-cdk-lib/aws-secretsmanager';
import { MeteringCore } from '../src';

// The Lambda asset is a plain directory the test prepares: Code.fromAsset only copies it.
function assetDirectory(): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'metering-asset-'));
  fs.mkdirSync(path.join(dir, 'metering_core'));
  fs.writeFileSync(path.join(dir, 'metering_core', '__init__.py'), '');
  fs.writeFileSync(
    path.join(dir, 'metering_core', 'aws.py'),
    'def api_handler(event, context): ...\n\ndef event_handler(event, context): ...\n',
  );
  return dir;
}

let template: Template;
beforeAll(() => {
  // No Docker here: sbt-aws's own PythonFunctions skip bundling with this context.
  const app = new cdk.App({ context: { 'aws:cdk:bundling-stacks': [] } });
  const stack = new cdk.Stack(app, 'ControlPlaneStack');
  const apiKey = new secretsmanager.Secret(stack, 'StripeKey');
  new ControlPlane(stack, 'ControlPlane', {
    systemAdminEmail: 'admin@example.com',
    metering: new MeteringCore(stack, 'Metering', {
      assetPath: assetDirectory(),
      provider: 'stripe',
      environment: { METERING_STRIPE_USE_EVENT_STREAM: 'true' },
      secrets: { METERING_STRIPE_API_KEY: apiKey },
    }),
  });
  template = Template.fromStack(stack);
});

/** The logical id of our function for one operation. */
function functionId(operation: string): string {
  const found = template.findResources('AWS::Lambda::Function', {
    Properties: { Environment: { Variables: { METERING_OPERATION: operation } } },
  });
  expect(Object.keys(found)).toHaveLength(1);
  return Object.keys(found)[0];
}

const ROUTES: Array<[string, string, string]> = [
  ['POST /meters', 'CreateMeter', 'metering/create_meter'],
  ['GET /meters', 'FetchAllMeters', 'metering/read_meters'],
  ['GET /meters/{meterId}', 'FetchMeter', 'metering/read_meter'],
  ['PUT /meters/{meterId}', 'UpdateMeter', 'metering/update_meter'],
  ['DELETE /meters/{meterId}', 'DeleteMeter', 'metering/delete_meter'],
  ['GET /usage/{meterId}', 'FetchUsage', 'metering/read_usage'],
  ['DELETE /usage', 'CancelUsageEvents', 'metering/cancel_usage'],
];

test.each(ROUTES)('route %s reaches %s and requires %s', (routeKey, operation, scope) => {
  const routes = template.findResources('AWS::ApiGatewayV2::Route', {
    Properties: { RouteKey: routeKey },
  });
  expect(Object.keys(routes)).toHaveLength(1);
  const route = Object.values(routes)[0].Properties;
  expect(route.AuthorizationType).toBe('JWT');
  expect(route.AuthorizationScopes).toEqual([scope]);
  const integration = template.toJSON().Resources[route.Target['Fn::Join'][1][1].Ref];
  expect(integration.Properties.PayloadFormatVersion).toBe('2.0');
  expect(integration.Properties.IntegrationUri).toEqual({
    'Fn::GetAtt': [functionId(operation), 'Arn'],
  });
});

const RULES: Array<[string, string]> = [
  ['ingestUsage', 'IngestUsageEvent'],
  ['onboardingRequest', 'CreateCustomer'],
  ['offboardingRequest', 'DeleteCustomer'],
];

test.each(RULES)('the %s rule targets %s', (detailType, operation) => {
  template.hasResourceProperties('AWS::Events::Rule', {
    EventPattern: Match.objectLike({ 'detail-type': [detailType] }),
    Targets: Match.arrayWith([
      Match.objectLike({ Arn: { 'Fn::GetAtt': [functionId(operation), 'Arn'] } }),
    ]),
  });
});

test('ten Python 3.12 functions run the handlers with the provider and its secret', () => {
  const variables = Match.objectLike({
    METERING_PROVIDER: 'stripe',
    METERING_STRIPE_USE_EVENT_STREAM: 'true',
    METERING_AWS_TENANT_CLAIM: 'custom:tenantId',
    METERING_SECRETS: Match.anyValue(),
  });
  for (const [handler, count] of [
    ['metering_core.aws.api_handler', 7],
    ['metering_core.aws.event_handler', 3],
  ] as const) {
    template.resourcePropertiesCountIs(
      'AWS::Lambda::Function',
      { Runtime: 'python3.12', Handler: handler, Environment: { Variables: variables } },
      count,
    );
  }
});

test('each function may read the secret, and only names it (never holds its value)', () => {
  const policies = template.findResources('AWS::IAM::Policy', {
    Properties: {
      PolicyDocument: {
        Statement: Match.arrayWith([
          Match.objectLike({ Action: Match.arrayWith(['secretsmanager:GetSecretValue']) }),
        ]),
      },
    },
  });
  expect(Object.keys(policies).length).toBeGreaterThanOrEqual(10);
  const fn = template.toJSON().Resources[functionId('FetchUsage')];
  const secrets = fn.Properties.Environment.Variables.METERING_SECRETS;
  expect(JSON.stringify(secrets)).toContain('StripeKey');
});
